"""Alembic, run programmatically: the engine's lineage first, then the service's own.

Each lineage has its own version table and only ever sees its own tables, so autogenerate in one
never proposes dropping another's (STYLE.md, example 10).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command, context
from alembic.config import Config
from sqlalchemy import MetaData, create_engine, pool

from servicekit.db import sync_url


@dataclass(frozen=True)
class Lineage:
    name: str
    script_location: Path
    version_table: str


FHIRKIT_LINEAGE = Lineage(
    "fhirkit", Path(__file__).resolve().parent.parent / "fhirkit" / "migrations", "fhirkit_alembic_version"
)


def _config(lineage: Lineage, url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(lineage.script_location))
    config.set_main_option("sqlalchemy.url", sync_url(url).replace("%", "%%"))
    config.attributes["version_table"] = lineage.version_table
    return config


def upgrade(url: str, lineages: list[Lineage], revision: str = "head") -> None:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    for lineage in lineages:
        command.upgrade(_config(lineage, url), revision)


def run_env(metadata: MetaData) -> None:
    """Body of every lineage's env.py."""
    config = context.config
    version_table = config.attributes.get("version_table", "alembic_version")
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "", poolclass=pool.NullPool)

    def include_name(name: str | None, type_: str, _parent: Any) -> bool:
        return type_ != "table" or name in metadata.tables

    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            version_table=version_table,
            include_name=include_name,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()

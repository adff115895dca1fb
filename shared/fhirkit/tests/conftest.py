"""The store tests' database: a fresh one per test, on SQLite and, with
ALLIANCE_TEST_POSTGRES_URL, on PostgreSQL too, copied from a migrated template per module."""

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import pytest_asyncio
from sqlalchemy import func, select

from fhirkit.store.tables import INDEX_TABLES, resource, resource_history
from servicekit.db import Database
from servicekit.events.testing import DatabaseTemplates, database_params, running


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatabaseTemplates]:
    found = DatabaseTemplates(tmp_path_factory.mktemp("store"))
    yield found
    found.drop_all()


@pytest_asyncio.fixture(params=database_params())
async def database(request: pytest.FixtureRequest, templates: DatabaseTemplates) -> AsyncIterator[Database]:
    async with running(templates.url(str(request.param))) as found:
        yield found


@pytest.fixture
def row_counts(database: Database) -> Callable[[], Awaitable[dict[str, int]]]:
    """How many rows the resource, history and index tables hold, by table: what a write added."""

    async def count() -> dict[str, int]:
        async with database.transaction(write=False) as conn:
            tables = {"resource": resource, "history": resource_history, **INDEX_TABLES}
            return {name: (await conn.execute(select(func.count()).select_from(table))).scalar_one()
                    for name, table in tables.items()}

    return count

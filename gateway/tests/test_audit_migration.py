"""`gateway_0005`: an audit trail written before AuditEvent was append-only loses its history copies
on upgrade, still verifies, and gets them back on a downgrade."""

import asyncio
from pathlib import Path

import sqlalchemy as sa
from alembic import command

from gateway import audit_chain
from gateway.platform import LINEAGE
from servicekit.events.testing import running
from servicekit.migrations import FHIRKIT_LINEAGE, _config, upgrade

EVENT = b'{"resourceType":"AuditEvent","id":"a1","action":"R"}'


def test_the_history_copies_go_and_come_back(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'gateway.db'}"
    upgrade(url, [FHIRKIT_LINEAGE])
    upgrade(url, [LINEAGE], "gateway_0004")
    engine = sa.create_engine(url)
    content_hash, chain_hash = audit_chain.link(audit_chain.GENESIS, EVENT)
    with engine.begin() as conn:
        for table in ("fhir_resource", "fhir_resource_history"):
            conn.execute(sa.text(
                f"INSERT INTO {table} (rid, resource_type, resource_id, version_id, last_updated, deleted, content"
                f"{', method' if 'history' in table else ''}) VALUES (7, 'AuditEvent', 'a1', 1, 5, false, :c"
                f"{', :m' if 'history' in table else ''})"), {"c": EVENT, "m": "POST"})
        conn.execute(sa.text("INSERT INTO fhir_resource_history (rid, resource_type, resource_id, version_id, "
                             "last_updated, deleted, content, method) VALUES (8, 'Subscription', 's1', 1, 5, false, "
                             "'{}', 'POST')"))
        conn.execute(sa.insert(audit_chain.audit_chain).values(seq=1, audit_id="a1", content_sha256=content_hash,
                                                                chain_sha256=chain_hash))

    def history() -> list[tuple[str, str | None]]:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(
                "SELECT resource_type, method FROM fhir_resource_history ORDER BY resource_type"))]

    upgrade(url, [LINEAGE])
    assert history() == [("Subscription", "POST")]  # only the AuditEvent's copy went
    assert asyncio.run(_verify(url.replace("sqlite://", "sqlite+aiosqlite://"))).broken_at is None
    command.downgrade(_config(LINEAGE, url), "gateway_0004")
    assert history() == [("AuditEvent", "POST"), ("Subscription", "POST")]
    engine.dispose()


async def _verify(url: str) -> audit_chain.Verdict:
    async with running(url) as database, database.transaction(write=False) as conn:
        return await audit_chain.verify(conn)

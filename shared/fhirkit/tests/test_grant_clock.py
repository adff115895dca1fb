"""Grants are judged on a clock rounded up to the next 10 s (fhirkit.access.GRANT_CLOCK_STEP_MICROS):
a grant ends up to 10 s early, never late, and a caller's condition is reused within the step."""

from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest_asyncio
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from fhirkit.access import GRANT_CLOCK_STEP_MICROS, AccessPolicy, grant_access
from fhirkit.store.tables import STORE_METADATA, reference_index, resource

STEP_START = 1_800_000_000_000_000  # a multiple of the step
NOW = STEP_START + 1  # just past it: the clock reads the next step
SECOND = 1_000_000
POLICY = AccessPolicy(grant_scopes=frozenset({"results"}))


@pytest_asyncio.fixture
async def conn() -> AsyncIterator[AsyncConnection]:
    engine = create_async_engine("sqlite+aiosqlite://")
    async with engine.begin() as connection:
        await connection.run_sync(STORE_METADATA.create_all)
        rid = (await connection.execute(insert(resource).values(
            resource_type="Observation", resource_id="o1", version_id=1, last_updated=NOW, deleted=False,
            owner="Organization/lab", content=b"{}").returning(resource.c.rid))).scalar_one()
        await connection.execute(insert(reference_index).values(
            rid=rid, resource_type="Observation", param="subject", target_type="Patient", target_id="p1"))
        for grantee, lasts in (("Organization/early", 5 * SECOND), ("Organization/later", 15 * SECOND)):
            await grant_access(connection, grantee=grantee, patient="Patient/p1", scope="results", source=grantee,
                               reason="test", expires_at=NOW + lasts, now=NOW)
        yield connection
    await engine.dispose()


async def _sees(conn: AsyncConnection, organization: str, now: int) -> bool:
    caller = SimpleNamespace(organization=organization, roles=(), level="county")
    clause = POLICY.visible(caller, resource, now=now)
    return (await conn.execute(select(resource.c.resource_id).where(clause))).first() is not None


async def test_a_grant_ending_within_the_clock_step_is_already_over(conn: AsyncConnection) -> None:
    assert GRANT_CLOCK_STEP_MICROS == 10 * SECOND
    assert not await _sees(conn, "Organization/early", NOW)  # 5 s left, but the clock reads +10 s
    assert await _sees(conn, "Organization/later", NOW)  # 15 s left: still open
    assert not await _sees(conn, "Organization/later", NOW + 10 * SECOND)  # the next step: over


async def test_at_the_step_itself_a_grant_is_judged_exactly(conn: AsyncConnection) -> None:
    assert await _sees(conn, "Organization/early", STEP_START)


async def test_one_condition_serves_a_caller_for_the_whole_step() -> None:
    caller = SimpleNamespace(organization="Organization/x", roles=(), level="county")
    first = POLICY.visible(caller, resource, now=NOW)
    assert POLICY.visible(caller, resource, now=NOW + 9 * SECOND) is first
    assert POLICY.visible(caller, resource, now=NOW + GRANT_CLOCK_STEP_MICROS) is not first


def test_a_condition_for_a_known_type_leaves_out_the_parts_for_other_types() -> None:
    """Every part of the condition but ownership tests the row's type; with the type known (a
    search, a read by id) the parts for other types are left out, and a public type needs none."""
    policy = AccessPolicy(public_types=frozenset({"Organization"}), parties={"ServiceRequest": ("performer",)},
                          follows={"Provenance": ("target",)}, grant_scopes=frozenset({"results"}),
                          granted_types=frozenset({"Observation"}))
    caller = SimpleNamespace(organization="Organization/thc", roles=(), level="township")

    def sql(resource_type: str | None) -> str:
        clause = policy.visible(caller, resource, now=NOW, resource_type=resource_type)
        return str(clause.compile(compile_kwargs={"literal_binds": True}))

    everything = sql(None)
    assert all(part in everything for part in ("'performer'", "fhir_access_grant", "'target'", "'Organization')"))
    observation = sql("Observation")
    assert "fhir_access_grant" in observation and "'performer'" not in observation and "'target'" not in observation
    service_request = sql("ServiceRequest")
    assert "'performer'" in service_request and "fhir_access_grant" not in service_request
    assert "'Organization')" not in observation + service_request  # the public types' test, left out
    assert policy.visible(caller, resource, now=NOW, resource_type="Organization") is None
    assert sql("Encounter").count("EXISTS") == 0  # its own rows only

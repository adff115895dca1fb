"""Which grants a referral or consultation Task leaves behind, state by state."""

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from fhirkit.access import DAY_MICROS
from fhirkit.store.tables import STORE_METADATA, access_grant
from servicekit.grants import TaskGrants, apply_task_grants

NOW = 1_800_000_000_000_000
RULE = TaskGrants("results", recent_days=7)


@pytest_asyncio.fixture
async def conn() -> AsyncIterator[AsyncConnection]:
    engine = create_async_engine("sqlite+aiosqlite://")
    async with engine.begin() as connection:
        await connection.run_sync(STORE_METADATA.create_all)
        yield connection
    await engine.dispose()


def task(status: str) -> dict:
    return {"resourceType": "Task", "id": "t1", "status": status, "for": {"reference": "Patient/p1"},
            "requester": {"reference": "Organization/township"}, "owner": {"reference": "Organization/county"}}


async def grants(conn: AsyncConnection) -> dict[str, int | None]:
    rows = await conn.execute(select(access_grant.c.grantee, access_grant.c.expires_at))
    return {row.grantee.split("/")[1]: row.expires_at for row in rows}


async def test_the_receiver_is_granted_from_acceptance_and_the_sender_from_the_start(conn: AsyncConnection) -> None:
    await apply_task_grants(conn, task("requested"), RULE, NOW)
    assert await grants(conn) == {"township": None}
    await apply_task_grants(conn, task("accepted"), RULE, NOW)
    assert await grants(conn) == {"township": None, "county": None}


async def test_completion_leaves_both_a_recent_window(conn: AsyncConnection) -> None:
    await apply_task_grants(conn, task("in-progress"), RULE, NOW)
    await apply_task_grants(conn, task("completed"), RULE, NOW)
    window = NOW + 7 * DAY_MICROS
    assert await grants(conn) == {"township": window, "county": window}


@pytest.mark.parametrize("ending", ["rejected", "cancelled", "failed"])
async def test_a_declined_or_cancelled_task_ends_the_receivers_access_at_once(conn: AsyncConnection, ending: str) -> None:
    await apply_task_grants(conn, task("accepted"), RULE, NOW)
    await apply_task_grants(conn, task(ending), RULE, NOW + 5)
    assert await grants(conn) == {"township": NOW + 5 + 7 * DAY_MICROS, "county": NOW + 5}


async def test_a_task_without_a_patient_grants_nothing(conn: AsyncConnection) -> None:
    await apply_task_grants(conn, {**task("accepted"), "for": {"reference": "Group/g1"}}, RULE, NOW)
    assert await grants(conn) == {}

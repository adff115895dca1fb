"""The hub's question "who collects events of these topics?": answered by the event's time, read
once per consumer transaction (a batch holds a bundle's events), and fresh again after the same
transaction changes a subscription."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from gateway.app import service_definitions
from gateway.subscriptions import queue
from gateway.subscriptions.criteria import SubscriptionConfig
from gateway.subscriptions.topics import TOPICS
from servicekit.db import Database
from servicekit.events.testing import running
from servicekit.migrations import upgrade

TOPIC = TOPICS[0].url


def config(endpoint: str) -> SubscriptionConfig:
    return SubscriptionConfig(topic_url=TOPIC, filters={}, endpoint=endpoint, content="id-only",
                              payload_type="application/fhir+json", heartbeat_seconds=None, timeout_seconds=5.0,
                              max_count=10, headers=[])


@pytest_asyncio.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'platform.db'}"
    upgrade(url, service_definitions()["platform"].all_lineages)
    async with running(url) as found:
        yield found


async def save(conn: object, subscription_id: str, now: int) -> None:
    await queue.save_subscription(conn, subscription_id, organization="Organization/thc-xikou",  # type: ignore[arg-type]
                                  client_id="c1", config=config(f"https://his.example/{subscription_id}"),
                                  secret="s", status="active", now=now)


async def test_who_collects_is_answered_by_the_events_time_and_after_changes_in_the_transaction(
    database: Database,
) -> None:
    async with database.transaction(write=True) as conn:
        await save(conn, "s1", now=100)

    async with database.transaction(write=True) as conn:
        assert await queue.collecting_for(conn, [TOPIC], occurred_at=50) == []  # before s1 existed
        assert [s.subscription_id for s in await queue.collecting_for(conn, [TOPIC], occurred_at=150)] == ["s1"]
        await save(conn, "s2", now=120)  # in the same transaction: not hidden by what was read
        found = await queue.collecting_for(conn, [TOPIC], occurred_at=150)
        assert sorted(s.subscription_id for s in found) == ["s1", "s2"]
        await queue.forget(conn, "s1")
        assert [s.subscription_id for s in await queue.collecting_for(conn, [TOPIC], occurred_at=150)] == ["s2"]
        assert await queue.collecting_for(conn, ["https://other.example/topic"], occurred_at=150) == []

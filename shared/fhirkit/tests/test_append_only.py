"""Append-only types (`StoreConfig.append_only`, the audit trail's AuditEvent): each resource is
stored once, as its resource row, with no copy in the history table. vread and every level of
history read that row; an update, patch or delete is refused and changes nothing."""

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import insert, select

from fhirkit.errors import Forbidden
from fhirkit.store.repository import Repository, StoreConfig
from fhirkit.store.tables import resource, resource_history
from servicekit.db import Database

Counts = Callable[[], Awaitable[dict[str, int]]]  # the row_counts fixture (conftest.py)


class Clock:
    """A store clock that moves one millisecond per write, so that every version's time differs."""

    def __init__(self) -> None:
        self.now = 1_800_000_000_000_000

    def __call__(self) -> int:
        self.now += 1000
        return self.now


def store(clock: Clock) -> StoreConfig:
    config = StoreConfig(resource_types=frozenset({"AuditEvent", "Basic"}), append_only=frozenset({"AuditEvent"}),
                         check_references=False)
    config.clock = clock
    return config


def audit(n: int) -> dict[str, Any]:
    return {"resourceType": "AuditEvent", "action": "R", "recorded": "2026-11-24T08:00:00+08:00",
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"},
            "agent": [{"requestor": True, "who": {"reference": "Organization/thc-xikou"}}],
            "source": {"observer": {"display": "gateway"}}, "outcomeDesc": f"event {n}"}


def basic(n: int) -> dict[str, Any]:
    return {"resourceType": "Basic", "code": {"text": f"basic {n}"}}


async def test_creates_write_no_history_rows_and_read_back_through_every_read(
    database: Database, row_counts: Counts,
) -> None:
    config = store(Clock())
    async with database.transaction(write=True) as conn:
        repo = Repository(conn, config)
        batch = await repo.create_records([audit(1), audit(2)])  # the audit writer's path
        single = await repo.create(audit(3))  # a system sending its own AuditEvent (IHE ATNA)
        named = await repo.update("AuditEvent", "given-id", {**audit(4), "id": "given-id"})  # PUT create
    counts = await row_counts()
    assert counts["resource"] == 4 and counts["history"] == 0
    assert counts["token"] > 0  # still indexed: searchable as any resource
    async with database.transaction(write=False) as conn:
        repo = Repository(conn, config)
        for resource_id, content in [*batch, (single.stored.resource_id, single.stored.content),
                                      ("given-id", named.stored.content)]:
            assert (await repo.read("AuditEvent", resource_id)).content == content
            assert (await repo.vread("AuditEvent", resource_id, "1")).content == content
            versions, cursor = await repo.history("AuditEvent", resource_id, count=10, since=None, cursor=None)
            assert [(v.content, v.method, v.version_id) for v in versions] == [(content, "POST", 1)] and cursor is None


async def test_a_change_is_refused_and_leaves_the_record_as_it_was(database: Database, row_counts: Counts) -> None:
    config = store(Clock())
    async with database.transaction(write=True) as conn:
        created = (await Repository(conn, config).create(audit(1))).stored
    before = await row_counts()
    for change in ("update", "patch", "delete"):
        with pytest.raises(Forbidden):
            async with database.transaction(write=True) as conn:
                repo = Repository(conn, config)
                if change == "update":
                    await repo.update("AuditEvent", created.resource_id, {**audit(9), "id": created.resource_id})
                elif change == "patch":
                    await repo.patch("AuditEvent", created.resource_id, lambda body: {**body, "action": "C"})
                else:
                    await repo.delete("AuditEvent", created.resource_id)
    assert await row_counts() == before
    async with database.transaction(write=False) as conn:
        assert (await Repository(conn, config).read("AuditEvent", created.resource_id)).content == created.content


async def test_type_history_pages_newest_first_and_filters_by_since_and_at(database: Database) -> None:
    clock = Clock()
    config = store(clock)
    ids = []
    async with database.transaction(write=True) as conn:
        for n in range(5):
            ids.append((await Repository(conn, config).create(audit(n))).stored.resource_id)
    async with database.transaction(write=False) as conn:
        repo = Repository(conn, config)
        seen, cursor = [], None
        for _ in range(3):
            page, cursor = await repo.history("AuditEvent", None, count=2, since=None, cursor=cursor)
            seen += page
        assert cursor is None
        assert [v.resource_id for v in seen] == ids[::-1]
        times = [v.last_updated for v in seen]
        assert times == sorted(times, reverse=True)
        since, _ = await repo.history("AuditEvent", None, count=10, since=times[1], cursor=None)
        assert [v.resource_id for v in since] == [ids[4], ids[3]]
        at, _ = await repo.history("AuditEvent", None, count=10, since=None, cursor=None, at=(times[3], times[3]))
        assert [v.resource_id for v in at] == [ids[1], ids[0]]  # written by then, and never replaced


async def test_the_store_history_merges_versions_and_append_only_records_newest_first(database: Database) -> None:
    config = store(Clock())
    written: list[tuple[str, int]] = []  # (reference, version) in the order they were written
    async with database.transaction(write=True) as conn:
        repo = Repository(conn, config)
        first = (await repo.create(basic(0))).stored
        written.append((first.reference, 1))
        for n in range(1, 4):
            event = (await repo.create(audit(n))).stored
            written.append((event.reference, 1))
            changed = (await repo.update("Basic", first.resource_id, {**basic(n), "id": first.resource_id})).stored
            written.append((changed.reference, changed.version_id))
        written += [(f"AuditEvent/{i}", 1) for i, _ in await repo.create_records([audit(10), audit(11)])]
    async with database.transaction(write=False) as conn:
        repo = Repository(conn, config)
        everything, _ = await repo.history(None, None, count=100, since=None, cursor=None)
        paged, cursor = [], None
        for _ in range(10):
            page, cursor = await repo.history(None, None, count=3, since=None, cursor=cursor)
            paged += page
            if cursor is None:
                break
    assert cursor is None
    listed = [(v.reference, v.version_id) for v in everything]
    assert [(v.reference, v.version_id) for v in paged] == listed  # pages neither skip nor repeat
    assert listed == written[::-1]  # the two records of one batch share their time: the later row first
    times = [v.last_updated for v in everything]
    assert times == sorted(times, reverse=True)


async def test_history_rows_from_before_a_type_was_append_only_are_not_listed_twice(database: Database) -> None:
    config = store(Clock())
    async with database.transaction(write=True) as conn:
        event = (await Repository(conn, config).create(audit(1))).stored
        rid = (await conn.execute(select(resource.c.rid).where(resource.c.resource_id == event.resource_id))).scalar_one()
        await conn.execute(insert(resource_history).values(  # as the store wrote it before AuditEvent was append-only
            rid=rid, resource_type="AuditEvent", resource_id=event.resource_id, version_id=1,
            last_updated=event.last_updated, deleted=False, method="POST", owner=None, content=event.content))
    async with database.transaction(write=False) as conn:
        repo = Repository(conn, config)
        for level in ("AuditEvent", None):
            versions, _ = await repo.history(level, None, count=10, since=None, cursor=None)
            assert [v.resource_id for v in versions] == [event.resource_id], level

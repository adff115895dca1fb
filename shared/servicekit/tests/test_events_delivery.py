"""Delivery: the same consumers on the in-process bus and on NATS JetStream, on SQLite and
PostgreSQL: once per event, in order per resource, redelivered after a failure, parked when
poisoned, filtered by subject, and nothing missed by a consumer that starts late."""

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncConnection

from fhirkit.store import driver
from fhirkit.store.repository import Repository
from servicekit.db import Database
from servicekit.events import Event, EventBus, InProcessBus, ServiceEvents, emit, unpublished_count
from servicekit.events.consumers import Consumer, RetryPolicy, claim, claim_all
from servicekit.events.testing import (
    DatabaseTemplates,
    Recorder,
    bus_params,
    count,
    database_params,
    drop_bus,
    effects,
    fast_options,
    make_bus,
    running,
    started,
    store_for,
    wait_for,
    write_patients,
)

DATABASES = database_params()
BUSES = bus_params()


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatabaseTemplates]:
    found = DatabaseTemplates(tmp_path_factory.mktemp("events-delivery"))
    yield found
    found.drop_all()


@pytest.fixture(params=DATABASES)
def database_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_asyncio.fixture
async def database(database_kind: str, templates: DatabaseTemplates) -> AsyncIterator[Database]:
    async with running(templates.url(database_kind)) as found:
        yield found


@pytest_asyncio.fixture(params=BUSES)
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[EventBus]:
    found = make_bus(request.param)
    yield found
    await drop_bus(found)


async def test_each_event_is_handled_once_and_in_order_per_resource(
    database: Database, bus: EventBus
) -> None:
    referral = ServiceEvents("referral", database, bus, fast_options())
    recorder = Recorder("trail")
    await referral.subscribe("trail", "referral.>", recorder)
    store = store_for(referral)

    async def edit(resource_id: str) -> None:
        for version in range(1, 9):
            async with database.transaction(write=True) as conn:
                body = {"resourceType": "Patient", "id": resource_id, "birthDate": f"2000-01-0{version}"}
                await Repository(conn, store).update("Patient", resource_id, body)

    async with started(referral):
        await asyncio.gather(*(edit(f"r{index}") for index in range(5)))
        await wait_for(lambda: _effect_count(database, "trail", 40))
        await wait_for(lambda: _no_backlog(database))

    handled = await effects(database, "trail")
    assert len(handled) == 40 and len({row["event_id"] for row in handled}) == 40
    for resource_id in {row["resource_id"] for row in handled}:
        versions = [row["version_id"] for row in handled if row["resource_id"] == resource_id]
        assert versions == list(range(1, 9)), (resource_id, versions)
    assert await count(database, "servicekit_inbox", "consumer = :c", c="trail") == 40


async def test_a_failed_handler_gets_the_event_again_and_handles_it_once(
    database: Database, bus: EventBus
) -> None:
    referral = ServiceEvents("referral", database, bus, fast_options())
    recorder = Recorder("flaky", fail_once_for={"p-1", "p-3"})
    await referral.subscribe("flaky", "referral.Patient.create", recorder)
    async with started(referral):
        await write_patients(database, store_for(referral), 5)
        await wait_for(lambda: _effect_count(database, "flaky", 5))

    handled = await effects(database, "flaky")
    assert sorted(row["resource_id"] for row in handled) == [f"p-{index}" for index in range(5)]
    # The two failed first deliveries came back and succeeded (a batch they were in was rolled
    # back whole, so its other events may have been called twice, but took effect once).
    assert sorted(recorder.failures) == ["p-1", "p-3"]
    assert await count(database, "servicekit_dead_letter") == 0


async def test_a_poison_event_is_parked_not_dropped_and_can_be_replayed(
    database: Database, bus: EventBus
) -> None:
    referral = ServiceEvents("referral", database, bus, fast_options())
    recorder = Recorder("strict", fail_always_for={"p-2"})
    await referral.subscribe("strict", "referral.Patient.*", recorder)
    async with started(referral):
        await write_patients(database, store_for(referral), 4)
        await wait_for(lambda: _effect_count(database, "strict", 3))
        await wait_for(lambda: _parked(database, "strict"))

        async with database.transaction(write=False) as conn:
            from sqlalchemy import select

            from servicekit.events import dead_letter

            [parked] = list(await conn.execute(select(dead_letter)))
        assert parked.resource_id == "p-2" and parked.attempts == 3 and "on purpose" in parked.error
        assert parked.payload is not None and b'"p-2"' in parked.payload
        # Three deliveries, and perhaps a batch it failed in before them (rolled back whole).
        assert recorder.calls.count(parked.event_id) in (3, 4)

        recorder.fail_always_for.clear()  # the bug is fixed
        assert await referral.replay_dead_letters("strict") == 1
    assert sorted(row["resource_id"] for row in await effects(database, "strict")) == [
        "p-0",
        "p-1",
        "p-2",
        "p-3",
    ]
    assert await count(database, "servicekit_dead_letter") == 0


async def test_consumers_receive_only_the_subjects_they_asked_for(database: Database, bus: EventBus) -> None:
    referral = ServiceEvents("referral", database, bus, fast_options())
    business, patients = Recorder("business"), Recorder("patients")
    await referral.subscribe("business", "referral.business.>", business)
    await referral.subscribe("patients", "*.Patient.create", patients)
    async with started(referral):
        await write_patients(database, store_for(referral), 3)
        async with database.transaction(write=True) as conn:
            await emit(conn, "referral.accepted", {"id": "sr1"}, service="referral")
            await emit(conn, "referral.closed", {"id": "sr1"}, service="referral")
        await wait_for(lambda: _effect_count(database, "business", 2))
        await wait_for(lambda: _effect_count(database, "patients", 3))
        await asyncio.sleep(0.3)  # would anything else arrive?
    assert [row["subject"] for row in await effects(database, "business")] == [
        "referral.business.referral.accepted",
        "referral.business.referral.closed",
    ]
    assert {row["subject"] for row in await effects(database, "patients")} == {"referral.Patient.create"}


async def test_a_consumer_in_another_service_that_starts_late_misses_nothing(
    database: Database, bus: EventBus, templates: DatabaseTemplates, database_kind: str
) -> None:
    # Embedded mode starts the services one after another: the publisher first, with a backlog.
    referral = ServiceEvents("referral", database, bus, fast_options())
    async with running(templates.url(database_kind)) as other_database:
        results = ServiceEvents("results-sharing", other_database, bus, fast_options())
        await results.subscribe("grants", "referral.business.referral.accepted", Recorder("grants"))
        async with database.transaction(write=True) as conn:
            for index in range(3):
                await emit(conn, "referral.accepted", {"n": index}, service="referral")
        await referral.start()
        await asyncio.sleep(0.3)
        async with started(results):
            await wait_for(lambda: _effect_count(other_database, "grants", 3))
        await referral.stop()
        assert [row["seq"] for row in await effects(other_database, "grants")] == [1, 2, 3]


async def test_the_dispatcher_wakes_on_commit_without_waiting_for_the_poll(
    database: Database, bus: EventBus
) -> None:
    referral = ServiceEvents("referral", database, bus, fast_options(poll_interval=30.0))
    await referral.subscribe("quick", "referral.>", Recorder("quick"))
    async with started(referral):
        await asyncio.sleep(0.2)  # the dispatcher has looked once and now sleeps for 30 s
        began = time.monotonic()
        await write_patients(database, store_for(referral), 1)
        await wait_for(lambda: _effect_count(database, "quick", 1), timeout=5)
        assert time.monotonic() - began < 2


async def test_published_events_are_kept_for_the_retention_and_then_pruned(database: Database) -> None:
    from servicekit.events import InProcessBus

    referral = ServiceEvents("referral", database, InProcessBus(), fast_options())
    await referral.subscribe("keep", "referral.>", Recorder("keep"))
    store = store_for(referral)
    async with started(referral):
        await write_patients(database, store, 3)
        await wait_for(lambda: _effect_count(database, "keep", 3))
        await wait_for(lambda: _no_backlog(database))
    await write_patients(database, store, 1, prefix="late")  # committed, not published (stopped)
    assert await referral.dispatcher.prune(before=1) == 0  # nothing is that old
    removed = await referral.dispatcher.prune(before=time.time_ns() // 1000 + 1)
    assert removed == 3
    assert await unpublished_count(database, "referral") == 1  # unpublished rows are never pruned
    assert await count(database, "servicekit_inbox") == 0


async def _effect_count(database: Database, consumer: str, expected: int) -> bool:
    found = await count(database, "test_event_effects", "consumer = :c", c=consumer)
    assert found <= expected, f"{consumer} handled {found} events, expected {expected}"
    return found == expected


async def _no_backlog(database: Database) -> bool:
    return await unpublished_count(database, "referral") == 0


async def _parked(database: Database, consumer: str) -> bool:
    return await count(database, "servicekit_dead_letter", "consumer = :c", c=consumer) > 0


# --- batches: events committed together are handled together ----------------------------------


@dataclass
class TransactionRecorder(Recorder):
    """Also records which consumer transaction handled each call (the transaction's memo dict,
    kept alive so that no two transactions are taken for one)."""

    transactions: list[dict[str, Any]] = field(default_factory=list)

    async def __call__(self, event: Event, conn: AsyncConnection) -> None:
        memo = driver.transaction_memo(conn, "test-batch")
        if not any(memo is seen for seen in self.transactions):
            self.transactions.append(memo)
        await super().__call__(event, conn)


async def _handled_after_writing_together(
    database: Database, recorder: TransactionRecorder, count_: int
) -> list[dict[str, Any]]:
    """Write `count_` patients in one transaction with `recorder` subscribed (in-process bus);
    the effects once every event is handled."""
    referral = ServiceEvents("referral", database, InProcessBus(), fast_options())
    await referral.subscribe(recorder.name, "referral.Patient.create", recorder)
    async with started(referral):
        async with database.transaction(write=True) as conn:
            repo = Repository(conn, store_for(referral), owner="Organization/test")
            for index in range(count_):
                await repo.create({"resourceType": "Patient", "active": True}, resource_id=f"p-{index}")
        await wait_for(lambda: _effect_count(database, recorder.name, count_))
        await wait_for(lambda: _no_backlog(database))
    return await effects(database, recorder.name)


async def test_events_committed_together_are_handled_in_one_consumer_transaction(database: Database) -> None:
    recorder = TransactionRecorder("batched")
    handled = await _handled_after_writing_together(database, recorder, 30)
    assert [row["resource_id"] for row in sorted(handled, key=lambda r: r["seq"])] == [f"p-{i}" for i in range(30)]
    assert len(recorder.calls) == 30 and len(recorder.transactions) == 1
    assert await count(database, "servicekit_inbox", "consumer = :c", c="batched") == 30


async def test_a_failure_in_a_batch_rolls_it_back_and_its_events_are_handled_one_by_one(
    database: Database,
) -> None:
    recorder = TransactionRecorder("batched", fail_once_for={"p-7"})
    handled = await _handled_after_writing_together(database, recorder, 12)
    # p-0 … p-6 were called in the failed batch and again alone: each took effect once.
    assert sorted(row["resource_id"] for row in handled) == sorted(f"p-{i}" for i in range(12))
    assert len({row["event_id"] for row in handled}) == 12
    assert recorder.failures == ["p-7"]
    assert len(recorder.calls) == 8 + 12  # the batch up to p-7, then each alone
    assert await count(database, "servicekit_inbox", "consumer = :c", c="batched") == 12
    assert await count(database, "servicekit_dead_letter") == 0


def _patient_event(number: int) -> Event:
    return Event(id=f"00000000-0000-4000-8000-{number:012d}", seq=number, service="referral", kind="resource",
                 type="create", occurred_at=1, resource_type="Patient", resource_id=f"p-{number}", version_id=1)


async def test_a_batch_claims_its_events_at_once_and_skips_those_handled_before_or_twice_in_it(
    database: Database,
) -> None:
    recorder = Recorder("claims")
    consumer = Consumer("claims", "referral.>", recorder, database, RetryPolicy())
    first, second, third = (_patient_event(n) for n in (1, 2, 3))
    assert await consumer.process_batch([second])
    # A redelivered event and one delivered twice in the batch: each is handled once.
    assert await consumer.process_batch([first, second, third, first])
    assert recorder.calls == [second.id, first.id, third.id]
    assert sorted(row["event_id"] for row in await effects(database, "claims")) == sorted(
        e.id for e in (first, second, third))
    async with database.transaction(write=True) as conn:
        assert await claim_all(conn, "claims", [first.id, "00000000-0000-4000-8000-000000000009"]) == {
            "00000000-0000-4000-8000-000000000009"}
        assert await claim(conn, "another-consumer", first.id)  # the inbox is per consumer

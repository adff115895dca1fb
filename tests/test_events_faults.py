"""Fault tests for the events (real databases, real NATS): a dispatcher killed while it delivers,
a consumer killed mid-stream, a broker killed during a burst, a dispatcher leader that goes away.
Each checks that every event is handled exactly once by a deduplicating consumer."""

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
import pytest_asyncio
from sqlalchemy import update

from fhirkit.store.repository import Repository, StoreConfig
from servicekit.db import Database
from servicekit.events import (
    Event,
    EventBus,
    InProcessBus,
    OutboxDispatcher,
    ServiceEvents,
    outbox,
    unpublished_count,
)
from servicekit.events.consumers import Consumer
from servicekit.events.testing import (
    FAST_RETRY,
    NATS_SERVER,
    POSTGRES_URL,
    DatabaseTemplates,
    PrivateNatsServer,
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
# Unacknowledged NATS deliveries come back after ack_wait; short, so the tests do not wait long.
TEST_ACK_WAIT = 1.5


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatabaseTemplates]:
    found = DatabaseTemplates(tmp_path_factory.mktemp("events-faults"))
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
    found = (
        make_bus(request.param, ack_wait_seconds=TEST_ACK_WAIT)
        if request.param == "nats"
        else make_bus("inprocess")
    )
    yield found
    await drop_bus(found)


async def _subscribed(
    events: ServiceEvents, recorder: Recorder, subject: str = "referral.>"
) -> ServiceEvents:
    await events.subscribe(recorder.name, subject, recorder)
    return events


async def _handled_exactly(database: Database, consumer: str, expected: int) -> bool:
    rows = await effects(database, consumer)
    assert len(rows) == len({row["event_id"] for row in rows}), f"{consumer} handled an event twice"
    return len(rows) == expected


async def test_a_dispatcher_killed_while_delivering_loses_nothing(database: Database, bus: EventBus) -> None:
    recorder = Recorder("exactly-once")
    first = await _subscribed(ServiceEvents("referral", database, bus, fast_options(batch_size=20)), recorder)
    # Committed while no dispatcher runs: the crash between commit and publish.
    await write_patients(database, store_for(first), 150)
    async with started(first):
        await wait_for(lambda: _at_least(database, "exactly-once", 50))
    # Killed wherever it was. And the crash between publish and mark: forget that the first 40
    # published rows were marked, so that they are published a second time.
    async with database.transaction(write=True) as conn:
        await conn.execute(update(outbox).where(outbox.c.seq <= 40).values(published_at=None))

    second = await _subscribed(
        ServiceEvents("referral", database, bus, fast_options(batch_size=20)), recorder
    )
    async with started(second):
        await wait_for(lambda: _handled_exactly(database, "exactly-once", 150))
        await wait_for(lambda: _no_backlog(database))
    assert await count(database, "servicekit_inbox", "consumer = 'exactly-once'") == 150


async def test_a_consumer_killed_mid_stream_gets_the_rest_and_nothing_twice(
    database: Database, bus: EventBus, templates: DatabaseTemplates, database_kind: str
) -> None:
    referral = ServiceEvents("referral", database, bus, fast_options())
    async with running(templates.url(database_kind)) as consumer_database:
        recorder = Recorder("results-feed")
        results = await _subscribed(
            ServiceEvents("results-sharing", consumer_database, bus, fast_options()), recorder
        )
        await referral.start()
        await results.start()
        writer = asyncio.create_task(write_patients(database, store_for(referral), 120))
        await wait_for(lambda: _at_least(consumer_database, "results-feed", 40))
        await results.stop()  # the consumer's process dies
        await writer
        await asyncio.sleep(0.3)
        restarted = await _subscribed(
            ServiceEvents("results-sharing", consumer_database, bus, fast_options()), recorder
        )
        async with started(restarted):
            await wait_for(lambda: _handled_exactly(consumer_database, "results-feed", 120))
        await referral.stop()


@pytest.mark.skipif(NATS_SERVER is None, reason="nats-server is not installed")
async def test_a_nats_restart_during_a_burst_of_500_events_loses_nothing(
    templates: DatabaseTemplates, tmp_path: Path
) -> None:
    # The broker is what fails here: SQLite is enough on the database side.
    async with running(templates.sqlite()) as database:
        await _burst_through_a_broker_restart(database, tmp_path)


async def _burst_through_a_broker_restart(database: Database, tmp_path: Path) -> None:
    broker = PrivateNatsServer(tmp_path / "jetstream")
    broker.start()
    bus = make_bus("nats", url=broker.url, ack_wait_seconds=TEST_ACK_WAIT, publish_timeout=1.0)
    recorder = Recorder("burst")
    referral = await _subscribed(
        ServiceEvents("referral", database, bus, fast_options(batch_size=50)), recorder
    )
    store = store_for(referral)
    try:
        async with started(referral):
            writer = asyncio.create_task(_burst(database, store, resources=100, versions=5))
            await wait_for(lambda: _at_least(database, "burst", 100))
            broker.kill()
            await asyncio.sleep(1.0)  # writes go on; the outbox keeps what cannot be published
            broker.start()
            await writer
            await wait_for(lambda: _handled_exactly(database, "burst", 500), timeout=40)
            await wait_for(lambda: _no_backlog(database))
            await _assert_stream_order_per_resource(bus, expected_events=500)
    finally:
        await drop_bus(bus)
        broker.kill()


@pytest.mark.skipif(not POSTGRES_URL, reason="ALLIANCE_TEST_POSTGRES_URL is not set")
async def test_one_dispatcher_leads_per_postgresql_database_and_another_takes_over(
    templates: DatabaseTemplates,
) -> None:
    url = templates.postgres()
    async with running(url) as consumer_db, running(url) as first_db, running(url) as second_db:
        bus = InProcessBus()
        recorder = Recorder("leader-test")
        await bus.subscribe(
            "consumer", Consumer("leader-test", "referral.>", recorder, consumer_db, FAST_RETRY)
        )
        await bus.start("consumer")
        options = fast_options(poll_interval=0.1).dispatcher
        first = OutboxDispatcher("referral", first_db, bus, options)
        second = OutboxDispatcher("referral", second_db, bus, options)
        first.start()
        second.start()
        store = store_for(ServiceEvents("referral", consumer_db, InProcessBus()))
        try:
            await wait_for(lambda: first.is_leader or second.is_leader)
            await asyncio.sleep(0.3)
            assert first.is_leader != second.is_leader
            leader, standby = (first, second) if first.is_leader else (second, first)
            await write_patients(consumer_db, store, 50)
            await wait_for(lambda: _handled_exactly(consumer_db, "leader-test", 50))

            await leader.stop()  # its process ends
            await wait_for(lambda: standby.is_leader, timeout=5)
            await write_patients(consumer_db, store, 50, prefix="after")
            await wait_for(lambda: _handled_exactly(consumer_db, "leader-test", 100))
        finally:
            await first.stop()
            await second.stop()
            await bus.stop("consumer")


class CountingBus(InProcessBus):
    """The in-process bus, noting how many events each publish carried."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    async def publish(self, events: Sequence[Event]) -> None:
        self.sizes.append(len(events))
        await super().publish(events)


async def test_a_backlog_is_read_in_growing_batches_and_a_drained_outbox_in_small_ones(database: Database) -> None:
    """Behind a busy process every await of a pass waits its turn, so a dispatcher that is
    behind (a full batch) doubles the next batch, up to the most; once drained it starts small."""
    bus = CountingBus()
    recorder = Recorder("growing-batches")
    await bus.subscribe("consumer", Consumer("growing-batches", "referral.>", recorder, database, FAST_RETRY))
    await bus.start("consumer")
    options = dataclasses.replace(fast_options(poll_interval=0.1).dispatcher, batch_size=10, max_batch_size=40)
    store = store_for(ServiceEvents("referral", database, InProcessBus()))
    await write_patients(database, store, 150)  # committed while no dispatcher runs: a backlog
    dispatcher = OutboxDispatcher("referral", database, bus, options)
    dispatcher.start()
    try:
        await wait_for(lambda: _handled_exactly(database, "growing-batches", 150))
        assert bus.sizes == [10, 20, 40, 40, 40]
        await write_patients(database, store, 1, prefix="after")
        await wait_for(lambda: _handled_exactly(database, "growing-batches", 151))
        assert bus.sizes[5:] == [1]
    finally:
        await dispatcher.stop()
        await bus.stop("consumer")


async def _burst(database: Database, store: StoreConfig, *, resources: int, versions: int) -> None:
    """`resources` patients, each updated to `versions` versions, interleaved."""
    for version in range(1, versions + 1):
        for index in range(resources):
            async with database.transaction(write=True) as conn:
                body = {"resourceType": "Patient", "id": f"b{index}", "birthDate": f"19{version:02d}-01-01"}
                await Repository(conn, store).update("Patient", f"b{index}", body)


async def _assert_stream_order_per_resource(bus: EventBus, expected_events: int) -> None:
    """Read the stream back: every event once (first occurrence) and each resource's versions
    in increasing order, i.e. the broker holds them in the order of the outbox."""
    import nats

    from servicekit.events.envelope import event_from_message
    from servicekit.events.nats_bus import NatsBus

    assert isinstance(bus, NatsBus)
    client = await nats.connect(bus.url)
    try:
        js = client.jetstream()
        last = (await js.stream_info(bus.stream)).state.last_seq
        seen: set[str] = set()
        versions: dict[str, list[int]] = {}
        for sequence in range(1, last + 1):
            raw = await js.get_msg(bus.stream, sequence)
            event = event_from_message(raw.headers, raw.data or b"")
            if event.id in seen:
                continue
            seen.add(event.id)
            versions.setdefault(event.resource_id or "", []).append(event.version_id or 0)
    finally:
        await client.close()
    assert len(seen) == expected_events
    assert all(found == sorted(found) for found in versions.values())


async def _at_least(database: Database, consumer: str, expected: int) -> bool:
    return await count(database, "test_event_effects", "consumer = :c", c=consumer) >= expected


async def _no_backlog(database: Database) -> bool:
    return await unpublished_count(database, "referral") == 0


async def test_the_embedded_system_delivers_across_services_and_after_a_restart(tmp_path: Path) -> None:
    """The real gateway with every service in-process: the directory's writes reach a consumer
    in results-sharing, including one committed while the system was down."""
    import httpx

    from gateway.app import create_gateway_app, service_definitions
    from servicekit.events import with_outbox
    from servicekit.events.testing import migrate
    from tests.support import Api, system_settings

    definitions = service_definitions()
    for name, definition in definitions.items():
        migrate(system_settings(tmp_path).database_url(name), definition.all_lineages)
    recorder = Recorder("rs-patients")

    async def run_system(write: bool, expected: int) -> None:
        system = create_gateway_app(system_settings(tmp_path))
        results = system.state.apps["results-sharing"]
        await results.state.events.subscribe("rs-patients", "directory.Patient.create", recorder)
        async with system.router.lifespan_context(system):
            if write:
                transport = httpx.ASGITransport(app=system)
                async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080") as client:
                    created = await Api(system, client).post(
                        "Patient", {"resourceType": "Patient", "active": True}
                    )
                    assert created.status_code == 201, created.text
            await wait_for(lambda: _handled_exactly(results.state.database, "rs-patients", expected))

    await run_system(write=True, expected=1)
    # The system is down; a write commits and nobody publishes it (a crash right after commit).
    directory_types = definitions["directory"].resource_types
    hooks = with_outbox("directory", directory_types, {})
    store = StoreConfig(resource_types=directory_types, hooks=hooks, check_references=False)
    async with (
        running(system_settings(tmp_path).database_url("directory")) as directory_db,
        directory_db.transaction(write=True) as conn,
    ):
        await Repository(conn, store).create({"resourceType": "Patient", "active": False})
    await run_system(write=False, expected=2)

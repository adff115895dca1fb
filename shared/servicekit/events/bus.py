"""The event bus: one interface, an in-process implementation (embedded) and NATS JetStream.

The dispatcher calls `publish`, which returns only once the bus has durably accepted the event;
the outbox row is marked published after that, so whatever the bus has not accepted is published
again later. Consumers are `servicekit.events.consumers.Consumer`s; each bus only moves events and
acts on the consumer's verdict (acknowledge, redeliver after a delay, or acknowledge a parked one).
"""

import asyncio
import logging
import time
import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

from servicekit.events.consumers import Consumer, Outcome
from servicekit.events.envelope import Event, subject_matches
from servicekit.events.tasks import stop_task

if TYPE_CHECKING:
    from servicekit.settings import AllianceSettings

log = logging.getLogger("alliance.events")

# How long the in-process bus waits for every service app built on it to start before it
# publishes anyway (an app that was built but never started must not hold the others forever).
STARTUP_GRACE_SECONDS = 30.0


class BusUnavailable(Exception):
    """The bus did not accept an event; its outbox row stays unpublished and is retried.
    `accepted` counts the events of the same `publish` that the bus accepted before it."""

    def __init__(self, message: str = "", accepted: int = 0) -> None:
        super().__init__(message)
        self.accepted = accepted


# At most this many queued events are handled in one consumer transaction.
MAX_BATCH = 500


class EventBus(Protocol):
    def attach(self, member: str) -> None:
        """A service app that will use this bus was built (its lifespan has not run yet)."""

    async def start(self, member: str) -> None:
        """The member's consumers are subscribed; its dispatcher may publish."""

    async def stop(self, member: str) -> None:
        """Stop the member's consumers; unacknowledged deliveries are redelivered later."""

    async def publish(self, events: Sequence[Event]) -> None:
        """Return once every event is durably accepted, in order; raise BusUnavailable (saying
        how many were accepted before) otherwise."""

    async def subscribe(self, member: str, consumer: Consumer) -> None:
        """Deliver every event whose subject matches `consumer.subject_filter`, at least once."""


class InProcessBus:
    """Embedded mode: every consumer runs in this process, so nothing between the outbox and the
    consumer's inbox is persistent. A publish is therefore accepted only once every matching
    consumer has settled the event (handled or parked it); a crash before that leaves the outbox
    row unpublished, and it is delivered again on restart.

    The embedded system starts its service apps one after another; publishing waits until every
    attached app has started (has subscribed its consumers), and is refused while one of them is
    stopped, so that no consumer misses an event because of start-up or shutdown order.
    """

    def __init__(self, startup_grace: float = STARTUP_GRACE_SECONDS) -> None:
        self.startup_grace = startup_grace
        self._expected: set[str] = set()  # attached: built, maybe not started yet
        self._started: set[str] = set()
        self._stopped: set[str] = set()  # stopped while others still run
        self._first_start: float | None = None
        self._changed = asyncio.Event()
        self._consumers: dict[str, _LocalConsumer] = {}

    def attach(self, member: str) -> None:
        self._expected.add(member)

    async def start(self, member: str) -> None:
        self._expected.add(member)
        self._started.add(member)
        self._stopped.discard(member)
        if self._first_start is None:
            self._first_start = time.monotonic()
        self._signal()

    async def stop(self, member: str) -> None:
        self._started.discard(member)
        self._stopped.add(member)
        for name, local in list(self._consumers.items()):
            if local.member == member:
                del self._consumers[name]
                await local.close()
        if not self._started:  # everyone stopped: the bus may be started again from scratch
            self._stopped.clear()
            self._first_start = None
        self._signal()

    async def subscribe(self, member: str, consumer: Consumer) -> None:
        if consumer.name in self._consumers:
            raise ValueError(f"A consumer named {consumer.name!r} is already subscribed")
        self._consumers[consumer.name] = _LocalConsumer(member, consumer)

    async def publish(self, events: Sequence[Event]) -> None:
        await self._wait_until_open()
        consumers = list(self._consumers.values())
        # Queued all at once, so that each consumer can handle them in batches.
        settling = [
            [local.deliver(event) for local in consumers if subject_matches(local.consumer.subject_filter, event.subject)]
            for event in events
        ]
        outcomes = await asyncio.gather(*(f for futures in settling for f in futures), return_exceptions=True)
        position = 0
        for accepted, futures in enumerate(settling):
            failures = [o for o in outcomes[position:position + len(futures)] if isinstance(o, BaseException)]
            position += len(futures)
            if failures:
                raise BusUnavailable(str(failures[0]), accepted=accepted) from failures[0]

    async def _wait_until_open(self) -> None:
        while True:
            if not self._started:
                raise BusUnavailable("The in-process bus is not running")
            if self._stopped:
                # Its consumers would miss the event: keep it in the outbox until it is back.
                raise BusUnavailable(f"{sorted(self._stopped)} stopped; not publishing until restarted")
            if self._expected <= self._started:
                return
            assert self._first_start is not None
            remaining = self._first_start + self.startup_grace - time.monotonic()
            if remaining <= 0:
                log.warning("publishing although %s never started", sorted(self._expected - self._started))
                self._expected &= self._started
                return
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), timeout=remaining)
            except TimeoutError:
                pass

    def _signal(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


class _LocalConsumer:
    """One consumer's queue, settled in publication order: what is queued is handled in batches
    (one transaction each); a batch that fails is settled one event at a time, and a failed
    delivery is retried in place after the consumer's backoff (which also keeps the order)."""

    def __init__(self, member: str, consumer: Consumer) -> None:
        self.member = member
        self.consumer = consumer
        self._queue: asyncio.Queue[tuple[Event, asyncio.Future[None]]] = asyncio.Queue()
        self._current: list[asyncio.Future[None]] = []
        self._task = asyncio.create_task(self._run(), name=f"consumer:{consumer.name}")

    def deliver(self, event: Event) -> "asyncio.Future[None]":
        settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((event, settled))
        return settled

    async def close(self) -> None:
        await stop_task(self._task)
        pending = list(self._current)
        while not self._queue.empty():
            pending.append(self._queue.get_nowait()[1])
        for settled in pending:
            if not settled.done():
                settled.set_exception(BusUnavailable(f"Consumer {self.consumer.name} stopped"))

    async def _run(self) -> None:
        while True:
            queued = [await self._queue.get()]
            while len(queued) < MAX_BATCH and not self._queue.empty():
                queued.append(self._queue.get_nowait())
            # A publisher that gave up (stopped) publishes its events again later.
            batch = [(event, settled) for event, settled in queued if not settled.done()]
            self._current = [settled for _, settled in batch]
            if len(batch) > 1 and await self.consumer.process_batch([event for event, _ in batch]):
                _resolve(settled for _, settled in batch)
            else:
                for event, settled in batch:
                    await self._settle(event)
                    _resolve([settled])
            self._current = []

    async def _settle(self, event: Event) -> None:
        attempt = 1
        while True:
            settlement = await self.consumer.process(event, attempt)
            if settlement.outcome is not Outcome.RETRY:
                return
            await asyncio.sleep(settlement.delay)
            attempt += 1


def _resolve(settled: Iterable["asyncio.Future[None]"]) -> None:
    for future in settled:
        if not future.done():
            future.set_result(None)


_SHARED: dict[int, EventBus] = {}


def shared_bus(settings: "AllianceSettings") -> EventBus:
    """The bus of every service app built from this settings object (the embedded system builds
    all of them from one): NATS JetStream when `nats_url` is set, otherwise in-process."""
    key = id(settings)
    bus = _SHARED.get(key)
    if bus is None:
        bus = _new_bus(settings)
        _SHARED[key] = bus
        weakref.finalize(settings, _SHARED.pop, key, None)
    return bus


def _new_bus(settings: "AllianceSettings") -> EventBus:
    if not settings.nats_url:
        return InProcessBus()
    from servicekit.events.nats_bus import NatsBus

    return NatsBus(
        settings.nats_url,
        stream=settings.nats_stream,
        subject_prefix=settings.nats_subject_prefix,
        max_age_seconds=settings.events_retention_days * 86400,
    )

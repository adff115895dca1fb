"""The dispatcher: publishes a service's outbox rows, at least once and in sequence order.

Rows are read in sequence order, published a batch at a time (the bus acknowledges them in
order) and marked published afterwards; no transaction is held while publishing, so
consumers writing to the same SQLite file never wait for the dispatcher. A crash before the mark
publishes the rows again (consumers deduplicate by event id); a crash before the publish loses
nothing, since the rows are still unpublished.

Two writes of one resource commit in the order of their sequence numbers (the second waits for
the first's row lock), so publishing in sequence order keeps the order per resource. With
several processes on one database (`alliance serve --workers N`, replicas) one of them
dispatches: on PostgreSQL the holder of a session advisory lock, on SQLite the holder of a lease
row (`servicekit.events.lease`), renewed while it leads. Two leaders at once (a lease that ran
out under a stalled leader) would publish some rows twice, which consumers deduplicate by event
id; it is never a loss.

The dispatcher wakes right after a commit that appended an event (a pool listener sees the
flag `outbox.PENDING_KEY` when the committed connection is checked in) and polls anyway.
"""

import asyncio
import logging
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, and_, delete, func, select, update
from sqlalchemy import event as sa_event
from sqlalchemy.ext.asyncio import AsyncConnection

from servicekit.db import Database
from servicekit.events.bus import BusUnavailable, EventBus
from servicekit.events.consumers import prune_inbox
from servicekit.events.envelope import Event, event_from_row, now_micros
from servicekit.events.lease import Lease, LeaseLost
from servicekit.events.outbox import PENDING_KEY
from servicekit.events.tables import outbox
from servicekit.events.tasks import stop_task, uninterrupted

log = logging.getLogger("alliance.events")

# pg_try_advisory_lock(int, int): the two-key space never meets the one-key locks that
# conditional creates take (pg_advisory_xact_lock(hashtext(...))).
ADVISORY_LOCK_CLASS = 0x0E7E


@dataclass(frozen=True)
class DispatcherOptions:
    poll_interval: float = 1.0
    batch_size: int = 200
    # A full batch means the dispatcher is behind: the next pass takes twice as many, up to this.
    # Behind a busy process each of a pass's dozen awaits waits its turn among the requests', so
    # events per pass, not passes per second, is what lets the dispatcher catch up.
    max_batch_size: int = 2000
    retention_seconds: float = 8 * 86400
    prune_interval: float = 600.0
    retry_pause_max: float = 5.0  # between publish attempts while the bus is unavailable
    # SQLite leadership: how long a lease lasts unrenewed (a leader that hangs, or dies on
    # another machine, is replaced after this; one that dies on this machine at once).
    lease_seconds: float = 15.0


def pending_statement(service: str, limit: int) -> Select[Any]:
    """The service's first `limit` unpublished rows in sequence order. The order is spelled as
    the (service, published_at, seq) index's columns, which the condition fixes but the first
    two: ordered by `seq` alone, PostgreSQL walked the primary key past every published row to
    the unpublished ones at the end (its statistics cannot tell they are all there): 1.5 s per
    poll, once a second, with 1,000,000 published rows."""
    return (select(outbox)
            .where(outbox.c.service == service, outbox.c.published_at.is_(None))
            .order_by(outbox.c.service, outbox.c.published_at, outbox.c.seq)
            .limit(limit))


class OutboxDispatcher:
    def __init__(self, service: str, database: Database, bus: EventBus, options: DispatcherOptions) -> None:
        self.service = service
        self.database = database
        self.bus = bus
        self.options = options
        self.is_leader = False
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_prune = 0.0
        self._failures = 0  # consecutive passes that failed on the database

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        sa_event.listen(self.database.engine.sync_engine, "checkin", self._on_checkin)
        self._task = asyncio.create_task(self._run(), name=f"outbox-dispatcher:{self.service}")

    async def stop(self) -> None:
        if self._task is None:
            return
        sa_event.remove(self.database.engine.sync_engine, "checkin", self._on_checkin)
        await stop_task(self._task)
        self._task = None

    def wake(self) -> None:
        self._wakeup.set()

    def _on_checkin(self, _dbapi_connection: Any, record: Any) -> None:
        # Runs when a connection goes back to the pool, after its commit (or rollback: a
        # spurious wake is harmless). The flag was set by the outbox in that transaction.
        if record is None or not record.info.pop(PENDING_KEY, False) or self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._wakeup.set)
        except RuntimeError:
            pass  # the loop is closed: nothing left to wake

    # --- the loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                async with self._leadership() as still_leader:
                    await self._lead(still_leader)
            except asyncio.CancelledError:
                raise
            except LeaseLost:
                log.warning("outbox dispatcher %s: lost the lead; standing by", self.service)
            except Exception as exc:  # the database is away: retry, never die
                self._failures += 1
                if self._failures == 1 or self._failures % 20 == 0:
                    log.warning("outbox dispatcher %s: %s; retrying", self.service, exc, exc_info=True)
                await asyncio.sleep(self._pause(self._failures))

    async def _lead(self, still_leader: Callable[[], Awaitable[None]]) -> None:
        bus_failures = 0
        batch = self.options.batch_size
        while True:
            await still_leader()
            try:
                published = await self.publish_pending(batch)
            except BusUnavailable as exc:
                bus_failures += 1
                if bus_failures == 1 or bus_failures % 20 == 0:
                    log.warning("outbox dispatcher %s: %s; retrying", self.service, exc)
                await asyncio.sleep(self._pause(bus_failures))
                continue
            if bus_failures:
                log.warning("outbox dispatcher %s: the bus accepts events again", self.service)
                bus_failures = 0
            self._failures = 0
            await self._prune_if_due()
            if published < batch:
                batch = self.options.batch_size
                await self._wait_for_work()
            else:
                batch = min(batch * 2, max(self.options.max_batch_size, self.options.batch_size))

    async def _wait_for_work(self) -> None:
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout=self.options.poll_interval)
        except TimeoutError:
            pass
        # Cleared before the next read: a commit after this point sets it again.
        self._wakeup.clear()

    def _pause(self, failures: int) -> float:
        return min(0.1 * 2 ** min(failures, 10), self.options.retry_pause_max)

    # --- one pass ----------------------------------------------------------------------------

    async def publish_pending(self, limit: int | None = None) -> int:
        """Publish one batch (`limit` rows, else the batch size) of unpublished rows in sequence
        order; returns how many the bus acknowledged. Raises BusUnavailable after marking those
        acknowledged before it failed."""
        events = await uninterrupted(self._unpublished(limit or self.options.batch_size))
        if not events:
            return 0
        try:
            await self.bus.publish(events)
        except BusUnavailable as exc:
            if exc.accepted:
                await uninterrupted(self._mark_published([e.seq for e in events[:exc.accepted]]))
            raise
        # Not on cancellation (stop): those rows are simply published again after the restart.
        await uninterrupted(self._mark_published([e.seq for e in events]))
        return len(events)

    async def _unpublished(self, limit: int) -> list[Event]:
        async with self.database.transaction(write=False) as conn:
            rows = await conn.execute(pending_statement(self.service, limit))
            return [event_from_row(row) for row in rows]

    async def _mark_published(self, seqs: list[int]) -> None:
        async with self.database.transaction(write=True) as conn:
            await conn.execute(update(outbox).where(outbox.c.seq.in_(seqs)).values(published_at=now_micros()))

    # --- retention ---------------------------------------------------------------------------

    async def _prune_if_due(self) -> None:
        assert self._loop is not None
        if self._loop.time() - self._last_prune < self.options.prune_interval:
            return
        self._last_prune = self._loop.time()
        removed = await uninterrupted(
            self.prune(now_micros() - int(self.options.retention_seconds * 1_000_000))
        )
        if removed:
            log.info("outbox dispatcher %s: pruned %d events past retention", self.service, removed)

    async def prune(self, before: int) -> int:
        """Delete published events that occurred before `before` (µs), and inbox entries
        recorded before it. Unpublished rows are never pruned."""
        async with self.database.transaction(write=True) as conn:
            result = await conn.execute(
                delete(outbox).where(
                    and_(
                        outbox.c.service == self.service,
                        outbox.c.published_at.is_not(None),
                        outbox.c.occurred_at < before,
                    )
                )
            )
            await prune_inbox(conn, before)
        return result.rowcount or 0

    # --- leadership --------------------------------------------------------------------------

    @asynccontextmanager
    async def _leadership(self) -> AsyncIterator[Callable[[], Awaitable[None]]]:
        """Yield once this process may dispatch, with a check that it still may."""
        if self.database.dialect != "postgresql":
            async with self._lease() as check:
                yield check
            return
        async with self.database.engine.connect() as conn:
            while not await uninterrupted(self._try_lock(conn)):
                await asyncio.sleep(self.options.poll_interval)  # another process dispatches
            self.is_leader = True
            log.info("outbox dispatcher %s: leading", self.service)
            try:
                # The lock lives as long as this connection: a broken one means it is gone.
                yield lambda: uninterrupted(_ping(conn))
            finally:
                self.is_leader = False
                await uninterrupted(_unlock(conn, self._lock_key()))

    @asynccontextmanager
    async def _lease(self) -> AsyncIterator[Callable[[], Awaitable[None]]]:
        """SQLite: lead while holding the lease row, renewed in the background (a publish may
        wait long on a retrying consumer); another process takes over once it is released, or
        expired, or its holder died."""
        lease = Lease(self.database, f"servicekit.events.dispatcher:{self.service}", self.options.lease_seconds)
        while not await _acquire(lease):
            await asyncio.sleep(self.options.poll_interval)  # another process dispatches
        self.is_leader = True
        log.info("outbox dispatcher %s: leading", self.service)
        keeper = asyncio.create_task(lease.keep(), name=f"outbox-lease:{self.service}")
        try:
            yield lease.check
        finally:
            self.is_leader = False
            await stop_task(keeper)
            try:
                await uninterrupted(lease.release())
            except Exception as exc:  # it expires anyway
                log.debug("lease release: %s", exc)

    def _lock_key(self) -> int:
        return _signed32(zlib.crc32(f"servicekit.events.dispatcher:{self.service}".encode()))

    async def _try_lock(self, conn: AsyncConnection) -> bool:
        result = await conn.execute(select(func.pg_try_advisory_lock(ADVISORY_LOCK_CLASS, self._lock_key())))
        acquired = bool(result.scalar_one())
        await conn.commit()  # the lock is session-level; do not sit idle in a transaction
        return acquired


async def _acquire(lease: Lease) -> bool:
    try:
        return await uninterrupted(lease.acquire())
    except asyncio.CancelledError:
        # Stopped while taking it: it may be ours now, and nobody would release it.
        await uninterrupted(lease.release())
        raise


async def _ping(conn: AsyncConnection) -> None:
    await conn.execute(select(1))
    await conn.commit()


async def _unlock(conn: AsyncConnection, key: int) -> None:
    try:
        await conn.execute(select(func.pg_advisory_unlock(ADVISORY_LOCK_CLASS, key)))
        await conn.commit()
    except Exception as exc:
        log.debug("advisory unlock: %s", exc)


def _signed32(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


async def unpublished_count(database: Database, service: str) -> int:
    async with database.transaction(write=False) as conn:
        result = await conn.execute(
            select(func.count())
            .select_from(outbox)
            .where(outbox.c.service == service, outbox.c.published_at.is_(None))
        )
        return int(result.scalar_one())

"""Idempotent consumers: what both buses do with an event they deliver.

A consumer's handler runs in a write transaction of the consumer's own database, together with an
inbox row keyed by (consumer, event id): the event's effects and the record that it was handled
commit together, so a redelivery (the bus is at least once) finds the inbox row and is skipped.
A handler that raises rolls everything back and the bus redelivers after a backoff; after
`max_attempts` deliveries the event is parked in the dead-letter table and logged.
"""

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from fhirkit.store import driver
from servicekit.db import Database
from servicekit.events.envelope import Event, event_from_row, now_micros, row_values
from servicekit.events.tables import dead_letter, inbox
from servicekit.events.tasks import uninterrupted
from servicekit.observability import request_id_var

Handler = Callable[[Event, AsyncConnection], Awaitable[None]]

log = logging.getLogger("alliance.events")

MAX_ERROR_TEXT = 2000


class Outcome(enum.Enum):
    DONE = "done"  # handled now or earlier: acknowledge
    RETRY = "retry"  # not handled: redeliver after the delay
    PARKED = "parked"  # given up and kept in the dead-letter table: acknowledge


@dataclass(frozen=True)
class Settlement:
    outcome: Outcome
    delay: float = 0.0


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    backoff: float = 1.0  # seconds before the second delivery; doubles each time
    backoff_max: float = 60.0

    def delay(self, attempt: int) -> float:
        return min(self.backoff * 2 ** max(attempt - 1, 0), self.backoff_max)


class Consumer:
    def __init__(
        self, name: str, subject_filter: str, handler: Handler, database: Database, policy: RetryPolicy
    ) -> None:
        self.name = name
        self.subject_filter = subject_filter
        self.handler = handler
        self.database = database
        self.policy = policy

    async def process(self, event: Event, attempt: int) -> Settlement:
        """Handle one delivery (`attempt` counts from 1) and say what the bus should do with it.
        Never raises (but for cancellation): a failure is a verdict too."""
        try:
            await uninterrupted(self._handle_once(event))
            return Settlement(Outcome.DONE)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return await self._after_failure(event, attempt, exc)

    async def process_batch(self, events: Sequence[Event]) -> bool:
        """Handle several first deliveries in one transaction (their effects and inbox rows commit
        together): a bundle's hundred events cost one transaction, not a hundred. False, with
        nothing committed, if any of them failed: the caller then settles them one at a time,
        so a bad event is retried and parked on its own and never holds back the others."""
        try:
            await uninterrupted(self._handle_together(events))
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("consumer %s: a batch of %d events failed (%s); handling them one by one",
                     self.name, len(events), _describe(exc))
            return False

    async def _after_failure(self, event: Event, attempt: int, error: Exception) -> Settlement:
        delay = self.policy.delay(attempt)
        if attempt < self.policy.max_attempts:
            log.warning(
                "consumer %s failed on event %s (%s), attempt %d of %d, retrying in %.1fs: %s",
                self.name,
                event.id,
                event.subject,
                attempt,
                self.policy.max_attempts,
                delay,
                _describe(error),
            )
            return Settlement(Outcome.RETRY, delay)
        try:
            await uninterrupted(self._park(event, attempt, error))
        except Exception:
            log.exception("consumer %s could not park event %s; it will be redelivered", self.name, event.id)
            return Settlement(Outcome.RETRY, delay)
        return Settlement(Outcome.PARKED)

    async def _handle_once(self, event: Event) -> None:
        await self._handle_together([event])

    async def _handle_together(self, events: Sequence[Event]) -> None:
        async with self.database.transaction(write=True) as conn:
            unhandled = await claim_all(conn, self.name, [event.id for event in events])
            for event in events:
                if event.id not in unhandled:
                    continue  # handled before (a redelivery), or earlier in this batch
                unhandled.discard(event.id)
                # The handler's logs and the events its writes emit carry the original request's id.
                token = request_id_var.set(event.request_id or f"event-{event.id}")
                try:
                    await self.handler(event, conn)
                finally:
                    request_id_var.reset(token)

    async def _park(self, event: Event, attempts: int, error: BaseException) -> None:
        values = {
            "consumer": self.name,
            "seq": event.seq,
            **row_values(event),
            "attempts": attempts,
            "error": _describe(error)[:MAX_ERROR_TEXT],
            "parked_at": now_micros(),
        }
        async with self.database.transaction(write=True) as conn:
            await conn.execute(_insert_ignoring_duplicates(conn, dead_letter, values))
        log.error(
            "consumer %s parked event %s (%s) after %d attempts: %s",
            self.name,
            event.id,
            event.subject,
            attempts,
            _describe(error),
            exc_info=error,
        )

    async def replay_parked(self) -> int:
        """Hand the consumer's dead letters to its handler again (after a fix); returns how many
        succeeded. Those that fail again stay parked with the new error."""
        async with self.database.transaction(write=False) as conn:
            rows = list(
                await conn.execute(
                    select(dead_letter).where(dead_letter.c.consumer == self.name).order_by(dead_letter.c.seq)
                )
            )
        replayed = 0
        for row in rows:
            replayed += await self._replay_one(row.id, event_from_row(row), row.attempts)
        return replayed

    async def _replay_one(self, row_id: int, event: Event, attempts: int) -> int:
        try:
            await self._handle_once(event)
        except Exception as exc:
            async with self.database.transaction(write=True) as conn:
                await conn.execute(
                    update(dead_letter)
                    .where(dead_letter.c.id == row_id)
                    .values(
                        attempts=attempts + 1, error=_describe(exc)[:MAX_ERROR_TEXT], parked_at=now_micros()
                    )
                )
            return 0
        async with self.database.transaction(write=True) as conn:
            await conn.execute(delete(dead_letter).where(dead_letter.c.id == row_id))
        return 1


async def claim(conn: AsyncConnection, consumer: str, event_id: str) -> bool:
    """Record that `consumer` handles `event_id` in this transaction; False if it already has.

    A concurrent duplicate (another replica or worker process got the event too) cannot apply it
    a second time: the row's primary key is (consumer, event id) and it is inserted in the
    handler's transaction. On PostgreSQL the duplicate's insert waits on the first one's
    uncommitted row and then sees the conflict; on SQLite write transactions begin with BEGIN
    IMMEDIATE, so the duplicate's starts after the first committed and finds the row.
    """
    return event_id in await claim_all(conn, consumer, [event_id])


async def claim_all(conn: AsyncConnection, consumer: str, event_ids: Sequence[str]) -> set[str]:
    """`claim` for several events in one statement (a bundle's hundred events): the ids this
    transaction now handles, the others handled already."""
    now = now_micros()
    # Sorted: two processes claiming overlapping batches take the rows' locks in one order (no
    # deadlock). RETURNING, not rowcount: psycopg's async driver reports -1 for an INSERT's rowcount.
    rows = [{"consumer": consumer, "event_id": event_id, "processed_at": now} for event_id in sorted(set(event_ids))]
    claimed = await driver.insert_rows(conn, inbox, rows, returning=("event_id",), skip_conflicts=True)
    return {event_id for (event_id,) in claimed}


async def prune_inbox(conn: AsyncConnection, before: int) -> int:
    result = await conn.execute(delete(inbox).where(inbox.c.processed_at < before))
    return result.rowcount or 0


def _insert_ignoring_duplicates(
    conn: AsyncConnection, table: Table, values: dict[str, Any]
) -> postgresql.Insert | sqlite.Insert:
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table).values(**values).on_conflict_do_nothing()
    return sqlite.insert(table).values(**values).on_conflict_do_nothing()


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


__all__ = ["Consumer", "Handler", "Outcome", "RetryPolicy", "Settlement", "claim", "claim_all", "prune_inbox"]

"""The durable per-subscription queue: state, pending matches, numbered events. SQL only; the
callers own the transactions."""

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, and_, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from fhirkit.store import driver
from gateway.subscriptions.criteria import SubscriptionConfig
from gateway.subscriptions.notifications import NotificationEvent
from gateway.subscriptions.tables import notification_event, pending_event, subscription_state
from servicekit.events import Event

# A subscription in these states collects events; `off` by the subscriber's choice does not.
COLLECTING = ("requested", "active", "error")


@dataclass(frozen=True)
class SubscriptionState:
    subscription_id: str
    organization: str
    client_id: str
    config: SubscriptionConfig
    secret: str | None
    status: str
    abandoned: bool
    handshake_done: bool
    events_since_start: int
    delivered_through: int
    attempts: int
    failing_since: int | None
    next_attempt_at: int
    last_error: str | None
    last_sent_at: int | None
    heartbeat_at: int | None
    created_at: int

    @property
    def collecting(self) -> bool:
        return self.status in COLLECTING or self.abandoned


def _state(row: Any) -> SubscriptionState:
    values = dict(row._mapping)
    values.pop("topic")
    values.pop("lease_until")
    values["config"] = SubscriptionConfig.from_json(values["config"])
    values["abandoned"] = bool(values["abandoned"])
    values["handshake_done"] = bool(values["handshake_done"])
    return SubscriptionState(**values)


async def load_state(conn: AsyncConnection, subscription_id: str) -> SubscriptionState | None:
    row = (await conn.execute(
        select(subscription_state).where(subscription_state.c.subscription_id == subscription_id)
    )).first()
    return _state(row) if row is not None else None


async def save_subscription(
    conn: AsyncConnection, subscription_id: str, *, organization: str, client_id: str, config: SubscriptionConfig,
    secret: str | None, status: str, now: int,
) -> None:
    """Record a subscriber's write. `requested` starts over with a handshake (the numbering and
    the undelivered events stay: delivery resumes where it stopped)."""
    driver.transaction_memo(conn, _COLLECTING_MEMO).clear()
    values: dict[str, Any] = {
        "organization": organization, "client_id": client_id, "topic": config.topic_url,
        "config": config.to_json(), "secret": secret, "status": status, "abandoned": False,
    }
    if status == "requested":
        values.update(handshake_done=False, attempts=0, failing_since=None, next_attempt_at=0, last_error=None)
    found = await conn.execute(
        update(subscription_state).where(subscription_state.c.subscription_id == subscription_id)
        .values(**values).returning(subscription_state.c.subscription_id)
    )
    if found.first() is None:
        await conn.execute(insert(subscription_state).values(
            subscription_id=subscription_id, events_since_start=0, delivered_through=0, last_sent_at=None,
            heartbeat_at=None, lease_until=None, created_at=now, **{"handshake_done": False, "attempts": 0, "failing_since": None,
                                                 "next_attempt_at": 0, "last_error": None, **values},
        ))


async def forget(conn: AsyncConnection, subscription_id: str) -> None:
    driver.transaction_memo(conn, _COLLECTING_MEMO).clear()
    for table in (pending_event, notification_event, subscription_state):
        await conn.execute(delete(table).where(table.c.subscription_id == subscription_id))


async def collecting_for(conn: AsyncConnection, topic_urls: list[str], occurred_at: int) -> list[SubscriptionState]:
    """Subscriptions to these topics that existed when the event happened (a NATS consumer that
    is new replays the stream's history: older events are not theirs). Read once per consumer
    transaction: a batch holds a bundle's hundred events, all asking about the same topics."""

    async def load() -> list[SubscriptionState]:
        return [_state(row) for row in await conn.execute(_COLLECTING, {"topics": topic_urls})]

    states = await driver.memoised(conn, _COLLECTING_MEMO, tuple(topic_urls), load)
    return [state for state in states if state.created_at <= occurred_at]


# Built once: the hub runs it for every resource event of the alliance.
_COLLECTING = select(subscription_state).where(
    subscription_state.c.topic.in_(bindparam("topics", expanding=True)),
    or_(subscription_state.c.status.in_(COLLECTING), subscription_state.c.abandoned.is_(True)),
)
_COLLECTING_MEMO = "collecting-subscriptions"  # cleared by the writers below


async def enqueue(conn: AsyncConnection, subscription_id: str, event: Event) -> None:
    assert event.resource_type and event.resource_id and event.version_id is not None
    values = {
        "subscription_id": subscription_id, "event_id": event.id, "interaction": event.type,
        "resource_type": event.resource_type, "resource_id": event.resource_id, "version_id": event.version_id,
        "service": event.service, "occurred_at": event.occurred_at,
    }
    await conn.execute(_insert_ignoring_duplicates(conn, pending_event, values))


async def due(conn: AsyncConnection, now: int) -> list[str]:
    """Subscriptions with something to do and no worker on them."""
    has_pending = select(pending_event.c.id).where(
        pending_event.c.subscription_id == subscription_state.c.subscription_id
    ).exists()
    owes_receiver = and_(
        subscription_state.c.status.in_(("requested", "active", "error")),
        subscription_state.c.next_attempt_at <= now,
        or_(
            subscription_state.c.handshake_done.is_(False),
            subscription_state.c.events_since_start > subscription_state.c.delivered_through,
            subscription_state.c.heartbeat_at <= now,
        ),
    )
    rows = await conn.execute(
        select(subscription_state.c.subscription_id).where(
            or_(subscription_state.c.lease_until.is_(None), subscription_state.c.lease_until < now),
            or_(has_pending, owes_receiver),
        )
    )
    return [row.subscription_id for row in rows]


async def take_lease(conn: AsyncConnection, subscription_id: str, now: int, until: int) -> bool:
    """One worker per subscription, also across gateway replicas (an atomic conditional update)."""
    result = await conn.execute(
        update(subscription_state)
        .where(
            subscription_state.c.subscription_id == subscription_id,
            or_(subscription_state.c.lease_until.is_(None), subscription_state.c.lease_until < now),
        )
        .values(lease_until=until)
        .returning(subscription_state.c.subscription_id)
    )
    return result.first() is not None


async def renew_lease(conn: AsyncConnection, subscription_id: str, held: int, until: int) -> bool:
    """Extend a lease this worker still holds (`held` is the expiry it set); False if it lost it."""
    result = await conn.execute(
        update(subscription_state)
        .where(subscription_state.c.subscription_id == subscription_id, subscription_state.c.lease_until == held)
        .values(lease_until=until)
        .returning(subscription_state.c.subscription_id)
    )
    return result.first() is not None


async def release_lease(conn: AsyncConnection, subscription_id: str, held: int | None = None) -> None:
    """Give the lease up; with `held`, only if it is still this worker's."""
    conditions = [subscription_state.c.subscription_id == subscription_id]
    if held is not None:
        conditions.append(subscription_state.c.lease_until == held)
    await conn.execute(update(subscription_state).where(*conditions).values(lease_until=None))


async def first_pending(conn: AsyncConnection, subscription_id: str) -> Any:
    return (await conn.execute(
        select(pending_event).where(pending_event.c.subscription_id == subscription_id)
        .order_by(pending_event.c.id).limit(1)
    )).first()


async def drop_pending(conn: AsyncConnection, pending_id: int) -> None:
    await conn.execute(delete(pending_event).where(pending_event.c.id == pending_id))


async def number_event(conn: AsyncConnection, pending: Any, payload: bytes | None, now: int) -> int:
    """Give the pending event the subscription's next number, in the caller's transaction."""
    current = (await conn.execute(
        select(subscription_state.c.events_since_start)
        .where(subscription_state.c.subscription_id == pending.subscription_id)
    )).scalar_one()
    number = current + 1
    await conn.execute(insert(notification_event).values(
        subscription_id=pending.subscription_id, event_number=number, event_id=pending.event_id,
        interaction=pending.interaction, resource_type=pending.resource_type, resource_id=pending.resource_id,
        version_id=pending.version_id, occurred_at=pending.occurred_at, payload=payload, recorded_at=now,
    ))
    await conn.execute(
        update(subscription_state).where(subscription_state.c.subscription_id == pending.subscription_id)
        .values(events_since_start=number)
    )
    await drop_pending(conn, pending.id)
    return number


async def already_numbered(conn: AsyncConnection, subscription_id: str, event_id: str) -> bool:
    found = await conn.execute(select(notification_event.c.event_number).where(
        notification_event.c.subscription_id == subscription_id, notification_event.c.event_id == event_id
    ))
    return found.first() is not None


async def events_between(
    conn: AsyncConnection, subscription_id: str, first: int, last: int | None, limit: int
) -> list[NotificationEvent]:
    conditions = [notification_event.c.subscription_id == subscription_id, notification_event.c.event_number >= first]
    if last is not None:
        conditions.append(notification_event.c.event_number <= last)
    rows = await conn.execute(
        select(notification_event).where(*conditions).order_by(notification_event.c.event_number).limit(limit)
    )
    return [
        NotificationEvent(row.event_number, row.interaction, row.resource_type, row.resource_id, row.occurred_at,
                          row.payload)
        for row in rows
    ]


async def oldest_retained(conn: AsyncConnection, subscription_id: str) -> int | None:
    return (await conn.execute(
        select(func.min(notification_event.c.event_number))
        .where(notification_event.c.subscription_id == subscription_id)
    )).scalar_one_or_none()


async def set_state_unless_changed(conn: AsyncConnection, state: SubscriptionState, **values: Any) -> bool:
    """Update the delivery state unless the subscriber rewrote the Subscription meanwhile (a new
    endpoint must get its own handshake, not the old one's success)."""
    result = await conn.execute(
        update(subscription_state)
        .where(
            subscription_state.c.subscription_id == state.subscription_id,
            subscription_state.c.config == state.config.to_json(),
            subscription_state.c.status == state.status,
            subscription_state.c.handshake_done == state.handshake_done,
        )
        .values(**values)
        .returning(subscription_state.c.subscription_id)
    )
    return result.first() is not None


async def prune(conn: AsyncConnection, before: int) -> None:
    await conn.execute(delete(notification_event).where(notification_event.c.recorded_at < before))


def _insert_ignoring_duplicates(
    conn: AsyncConnection, table: Table, values: dict[str, Any]
) -> postgresql.Insert | sqlite.Insert:
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table).values(**values).on_conflict_do_nothing()
    return sqlite.insert(table).values(**values).on_conflict_do_nothing()

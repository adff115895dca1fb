"""Appending events to the outbox, in the transaction of the change they announce.

`OutboxHooks` wraps a resource type's own hooks and appends a resource event after every stored
write; `emit` appends a business event. Either way the row commits or rolls back with the change,
so an event exists exactly when its change does. The row is published later by the dispatcher.
"""

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import bindparam, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from fhirkit import jsonio
from fhirkit.store import driver
from fhirkit.store.hooks import BatchHooks, NoHooks, ResourceHooks, WriteContext, creates_together
from fhirkit.store.tables import resource as resource_table
from servicekit.events.envelope import (
    Event,
    check_event_type,
    check_subject_token,
    new_event_id,
    now_micros,
    row_values,
)
from servicekit.events.tables import outbox
from servicekit.observability import request_id_var

if TYPE_CHECKING:
    from fhirkit.store.repository import Repository

# Set on a connection that appended an event; the dispatcher's pool listener sees it when the
# connection is checked in, i.e. after the commit, and wakes the dispatcher (see dispatcher.py).
PENDING_KEY = "servicekit.events.pending"


class OutboxHooks:
    """A resource type's own hooks around an outbox row for the write they allowed."""

    def __init__(self, service: str, inner: ResourceHooks) -> None:
        self.service = service
        self.inner = inner

    async def before_write(
        self, repo: "Repository", resource: dict[str, Any] | None, context: WriteContext
    ) -> None:
        await self.inner.before_write(repo, resource, context)

    async def after_write(
        self, repo: "Repository", resource: dict[str, Any] | None, context: WriteContext
    ) -> None:
        # The change first, then what the service makes of it: a business event its own
        # after_write emits for this write gets the next sequence number. The event's row goes
        # with the service's own next insert where it can (driver.gathering, opened by the
        # repository around after-hooks); an emitted event's insert writes it first.
        await append_resource_event(repo.conn, self.service, context)
        await self.inner.after_write(repo, resource, context)

    def creates_together(self, resource: dict[str, Any]) -> bool:
        return creates_together(self.inner, resource)

    async def before_creates(self, repo: "Repository", resources: list[dict[str, Any]]) -> None:
        await cast(BatchHooks, self.inner).before_creates(repo, resources)

    async def after_creates(
        self, repo: "Repository", resources: list[dict[str, Any]], contexts: list[WriteContext]
    ) -> None:
        # As after_write: the changes' events first (one statement), then the service's own part.
        events = [_resource_event(self.service, context, context.stored) for context in contexts]
        await driver.insert_later(repo.conn, outbox, [row_values(event) for event in events])
        repo.conn.info[PENDING_KEY] = True
        await cast(BatchHooks, self.inner).after_creates(repo, resources, contexts)


def with_outbox(
    service: str, resource_types: Iterable[str], hooks: Mapping[str, ResourceHooks]
) -> dict[str, ResourceHooks]:
    """`StoreConfig.hooks` for a service: every type's hooks composed with the outbox."""
    check_subject_token("Service name", service)
    types = set(resource_types) | set(hooks)
    return {name: OutboxHooks(service, hooks.get(name) or NoHooks()) for name in sorted(types)}


async def append_resource_event(conn: AsyncConnection, service: str, context: WriteContext) -> None:
    """The resource event of a write, in its transaction (with the next insert inside
    `driver.gathering`)."""
    # The version number, time, owner and the exact bytes a reader gets (null once deleted):
    # what the repository just wrote, or else read back inside this transaction.
    stored = context.stored or (await conn.execute(_CURRENT_VERSION, {
        "resource_type": context.resource_type, "resource_id": context.resource_id,
    })).one()
    await driver.insert_later(conn, outbox, [row_values(_resource_event(service, context, stored))])
    conn.info[PENDING_KEY] = True


def _resource_event(service: str, context: WriteContext, stored: Any) -> Event:
    return Event(
        id=new_event_id(),
        seq=0,
        service=service,
        kind="resource",
        type=_interaction(context),
        occurred_at=stored.last_updated,
        resource_type=context.resource_type,
        resource_id=context.resource_id,
        version_id=stored.version_id,
        owner=stored.owner,
        request_id=_request_id(),
        payload=stored.content,
    )


async def emit(
    conn: AsyncConnection,
    event_type: str,
    payload: Mapping[str, Any] | bytes | None = None,
    *,
    service: str,
    resource_type: str | None = None,
    resource_id: str | None = None,
    version_id: int | None = None,
    owner: str | None = None,
) -> Event:
    """Append a business event (e.g. `referral.accepted`) in the caller's transaction.

    It is published as `<prefix>.<service>.business.<event_type>` once the transaction commits,
    and never if it rolls back. `payload` is a JSON object or its encoded bytes.
    """
    check_event_type(event_type)
    check_subject_token("Service name", service)
    body = payload if isinstance(payload, bytes) or payload is None else jsonio.dumps(dict(payload))
    event = Event(
        id=new_event_id(),
        seq=0,
        service=service,
        kind="business",
        type=event_type,
        occurred_at=now_micros(),
        resource_type=resource_type,
        resource_id=resource_id,
        version_id=version_id,
        owner=owner,
        request_id=_request_id(),
        payload=body,
    )
    return await _append(conn, event)


# Built once: building statements per write cost more than running them.
_CURRENT_VERSION = select(
    resource_table.c.version_id, resource_table.c.last_updated, resource_table.c.owner, resource_table.c.content
).where(
    resource_table.c.resource_type == bindparam("resource_type"),
    resource_table.c.resource_id == bindparam("resource_id"),
)
_INSERT_EVENT = insert(outbox).returning(outbox.c.seq)


async def _append(conn: AsyncConnection, event: Event) -> Event:
    rows = await driver.execute(conn, _INSERT_EVENT, row_values(event))
    conn.info[PENDING_KEY] = True
    return replace(event, seq=rows[0][0])


def _interaction(context: WriteContext) -> str:
    # A PUT that creates (or brings back a deleted resource) is a create for whoever listens.
    if context.previous is None and context.interaction != "delete":
        return "create"
    return context.interaction


def _request_id() -> str | None:
    value = request_id_var.get()
    return None if value == "-" else value[:64]

"""Treatment relationships become grants (fhirkit.access) from the Tasks that create them.

A referral or teleconsultation Task names the patient (`for`), the sender (`requester`) and the
receiver (`owner`). While it is open both parties may read the patient's data of a scope; when it
ends well (completed) they keep it for a recent-relationship window; when the receiver declines
or the sender cancels, the receiver's access ends at once. The service holding the Task applies
this in the Task's own transaction; other services apply it from the Task's events.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from fhirkit import jsonio
from fhirkit.access import DAY_MICROS, grant_access, revoke_access
from fhirkit.workflow.machine import reference_of
from servicekit.events import Event

OPEN = frozenset({"draft", "requested", "received", "accepted", "ready", "in-progress", "on-hold"})
ACCEPTED = frozenset({"accepted", "in-progress", "on-hold", "completed"})
RECENT_DAYS = 30  # the default of ALLIANCE_RELATIONSHIP_DAYS_AFTER_CLOSE


@dataclass(frozen=True)
class TaskGrants:
    """What a Task grants in one service: `scope`, to the receiver from which statuses on."""

    scope: str
    receiver_from: frozenset[str] = ACCEPTED
    recent_days: int = RECENT_DAYS
    # Services whose Task events grant here (besides the service's own Task writes).
    from_services: tuple[str, ...] = ()
    applies_to: Callable[[dict[str, Any]], bool] = lambda task: True


def _reference(value: Any, prefix: str) -> str | None:
    reference = reference_of(value)
    return reference if reference is not None and reference.startswith(prefix) else None


async def apply_task_grants(conn: AsyncConnection, task: dict[str, Any], rule: TaskGrants, now: int) -> None:
    patient = _reference(task.get("for"), "Patient/")
    if patient is None or not task.get("id") or not rule.applies_to(task):
        return
    source = f"Task/{task['id']}"
    status = str(task.get("status"))
    until = None if status in OPEN else now + rule.recent_days * DAY_MICROS
    reason = f"{status} {source}"
    requester = _reference(task.get("requester"), "Organization/")
    receiver = _reference(task.get("owner"), "Organization/")
    if requester:  # the sender keeps a recent relationship whatever the outcome
        await grant_access(conn, grantee=requester, patient=patient, scope=rule.scope,
                           source=f"{source}#{requester}", reason=reason, expires_at=until, now=now)
    if receiver and status in rule.receiver_from:
        await grant_access(conn, grantee=receiver, patient=patient, scope=rule.scope,
                           source=f"{source}#{receiver}", reason=reason, expires_at=until, now=now)
    elif receiver:  # not accepted yet, declined or cancelled: no access by this Task
        await revoke_access(conn, source=f"{source}#{receiver}", now=now)


def task_event_handler(rule: TaskGrants) -> Callable[[Event, AsyncConnection], Any]:
    async def handle(event: Event, conn: AsyncConnection) -> None:
        if event.payload:
            await apply_task_grants(conn, jsonio.loads(event.payload), rule, event.occurred_at)

    return handle

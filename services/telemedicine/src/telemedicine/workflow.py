"""The telemedicine Task state machine as data for the shared workflow engine (DOMAIN.md §4).

requested → received → accepted | rejected(reason) ; accepted → in-progress (the session) ;
accepted|in-progress → completed (the signed report) | failed(reason) ; received|accepted → on-hold
(reason) → back ; draft..on-hold → cancelled (reason, by the inviting party). Only the invited party
moves an invitation forward; only the inviting party cancels. `$forward`, `$assign-practitioner`
and `$convert-to-referral` are operations of their own (onward.py, assignment.py, conversion.py).
"""

from typing import Any

from fhirkit.errors import BusinessRuleViolation
from fhirkit.workflow.machine import (
    RESUME_TARGET,
    StateMachine,
    TaskRules,
    Transition,
    Workflow,
    reference_of,
    transition,
)
from telemedicine import report
from telemedicine.vocabulary import BUSINESS_STATUS_SYSTEM, is_telemedicine_task

OWNER, REQUESTER, SYSTEM = "owner", "requester", "system"

TELEMEDICINE_MACHINE = StateMachine(
    name="telemedicine",
    initial=frozenset({"draft", "requested"}),
    business_status_system=BUSINESS_STATUS_SYSTEM,
    transitions=(
        transition("submit", {"draft"}, "requested", {REQUESTER}, business_status="invited"),
        transition("receive", {"requested"}, "received", {OWNER}, business_status="under-review"),
        transition("accept", {"requested", "received"}, "accepted", {OWNER}, business_status="accepted"),
        transition("reject", {"requested", "received"}, "rejected", {OWNER}, requires_reason=True,
                   business_status="declined"),
        transition("hold", {"received", "accepted"}, "on-hold", {OWNER}, requires_reason=True,
                   business_status="awaiting-information"),
        transition("resume", {"on-hold"}, RESUME_TARGET, {OWNER}, business_status="information-received"),
        transition("start", {"accepted"}, "in-progress", {OWNER}, business_status="session-started"),
        transition("complete", {"accepted", "in-progress"}, "completed", {OWNER}, requires_output=True,
                   business_status="report-issued"),
        transition("fail", {"accepted", "in-progress"}, "failed", {OWNER}, requires_reason=True,
                   business_status="not-performed"),
        transition("cancel", {"draft", "requested", "received", "accepted", "on-hold"}, "cancelled", {REQUESTER, SYSTEM},
                   requires_reason=True, business_status="cancelled-by-requester"),
    ),
)


async def telemedicine_roles(repo: Any, task: dict[str, Any], previous: dict[str, Any] | None) -> frozenset[str]:
    """The caller's roles: the invited party (owner), the inviting party (requester, or whoever
    created this hop), the platform."""
    caller = repo.caller
    organization = getattr(caller, "organization", None)
    roles: set[str] = set()
    if SYSTEM in getattr(caller, "roles", ()):
        roles.add(SYSTEM)
    current = previous or task
    if organization and organization == reference_of(current.get("owner")):
        roles.add(OWNER)
    if organization and organization in await _requesters(repo, current, creating=previous is None):
        roles.add(REQUESTER)
    return frozenset(roles)


async def _requesters(repo: Any, task: dict[str, Any], *, creating: bool) -> set[str]:
    found = {reference_of(task.get("requester")) or ""}
    if creating:
        found.add(getattr(repo.caller, "organization", "") or "")
    elif task.get("id"):
        stored = await repo.read("Task", task["id"])
        if stored.owner:
            found.add(stored.owner)  # the organization that created this hop (a forwarding party)
    return found - {""}


async def _invited_party_known(repo: Any, move: Transition, task: dict[str, Any], previous: dict[str, Any]) -> None:
    if not task.get("owner"):
        raise BusinessRuleViolation("An invitation is accepted by the invited party: set Task.owner",
                                    expression=["Task.owner"])


TELEMEDICINE_WORKFLOW = Workflow(
    TaskRules(
        machine=TELEMEDICINE_MACHINE,
        roles=telemedicine_roles,
        guards={"accept": _invited_party_known, "complete": report.require_signed_report},
        parties_may_edit=frozenset({OWNER, REQUESTER, SYSTEM}),
    ),
    is_telemedicine_task,
)
WORKFLOWS = [TELEMEDICINE_WORKFLOW]

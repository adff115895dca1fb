"""The referral Task state machine (DOMAIN.md §2) as data for the shared workflow engine.

requested → received → accepted | rejected(reason) ; accepted → in-progress → completed(outcome) ;
received|accepted → on-hold(reason) → back ; requested|received|accepted|on-hold → cancelled(reason, by
the sender) ; accepted → failed(reason: no-show). Only the receiver moves a referral forward; only
the sender cancels (the scheduler may cancel an expired routine referral).
"""

from typing import Any

from fhirkit.errors import BusinessRuleViolation
from fhirkit.workflow.machine import (  # reference_of is re-exported for the referral modules
    RESUME_TARGET,
    StateMachine,
    TaskRules,
    Transition,
    Workflow,
    reference_of,
    transition,
)

BASE = "http://county-alliance.org/fhir"
TASK_CODE_SYSTEM = f"{BASE}/CodeSystem/task-code"
BUSINESS_STATUS_SYSTEM = f"{BASE}/CodeSystem/referral-business-status"

OWNER, REQUESTER, DESK, SYSTEM = "owner", "requester", "desk", "system"



REFERRAL_MACHINE = StateMachine(
    name="referral",
    initial=frozenset({"draft", "requested"}),
    business_status_system=BUSINESS_STATUS_SYSTEM,
    transitions=(
        transition("submit", {"draft"}, "requested", {REQUESTER}, business_status="submitted"),
        transition("receive", {"requested"}, "received", {OWNER}, business_status="awaiting-triage"),
        transition("accept", {"requested", "received"}, "accepted", {OWNER}, business_status="accepted"),
        transition("reject", {"requested", "received"}, "rejected", {OWNER}, requires_reason=True,
           business_status="rejected-by-performer"),
        transition("hold", {"received", "accepted"}, "on-hold", {OWNER}, requires_reason=True,
           business_status="awaiting-information"),
        transition("resume", {"on-hold"}, RESUME_TARGET, {OWNER}, business_status="information-received"),
        transition("start", {"accepted"}, "in-progress", {OWNER}, business_status="patient-arrived"),
        transition("complete", {"in-progress"}, "completed", {OWNER}, requires_output=True, business_status="completed"),
        transition("fail", {"accepted"}, "failed", {OWNER}, requires_reason=True, business_status="no-show"),
        transition("cancel", {"draft", "requested", "received", "accepted", "on-hold"}, "cancelled", {REQUESTER, SYSTEM},
           requires_reason=True, business_status="cancelled-by-requester"),
    ),
)


def is_referral_task(task: dict[str, Any]) -> bool:
    for coding in (task.get("code") or {}).get("coding") or []:
        if coding.get("system") == TASK_CODE_SYSTEM and coding.get("code") == "referral":
            return True
    return False


async def referral_roles(repo: Any, task: dict[str, Any], previous: dict[str, Any] | None) -> frozenset[str]:
    """The caller's roles on a referral Task: the sender, the receiver, the county referral desk."""
    caller = repo.caller
    organization = getattr(caller, "organization", None)
    roles: set[str] = set()
    if SYSTEM in getattr(caller, "roles", ()):
        roles.add(SYSTEM)
    current = previous or task
    if organization and organization == reference_of(current.get("owner")):
        roles.add(OWNER)
    if organization and organization in await _senders(repo, current, previous is None):
        roles.add(REQUESTER)
    if getattr(caller, "level", None) == "county" and not current.get("owner"):
        roles.add(DESK)  # the county hospital's referral desk handles referrals with no receiver
    return frozenset(roles)


async def _senders(repo: Any, task: dict[str, Any], creating: bool) -> set[str]:
    senders = set()
    requester = reference_of(task.get("requester"))
    if requester and requester.startswith("Organization/"):
        senders.add(requester)
    if creating:
        senders.add(getattr(repo.caller, "organization", ""))
    elif task.get("id"):
        stored = await repo.read("Task", task["id"])
        if stored.owner:
            senders.add(stored.owner)  # the organization that created the Task
    return senders


async def _outcome_exists(repo: Any, transition: Transition, task: dict[str, Any], previous: dict[str, Any]) -> None:
    # Task.output references are checked for existence by the engine on every write; completion
    # additionally needs one of them to be the outcome document itself.
    documents = [reference_of(o.get("valueReference")) or "" for o in task.get("output") or []]
    if not any(d.startswith(("DocumentReference/", "Composition/", "DiagnosticReport/")) for d in documents):
        raise BusinessRuleViolation(
            "$complete needs the outcome document (回转单 / discharge summary) as a DocumentReference or "
            "Composition in Task.output",
            expression=["Task.output"],
        )


async def _receiver_known(repo: Any, transition: Transition, task: dict[str, Any], previous: dict[str, Any]) -> None:
    if not task.get("owner"):
        raise BusinessRuleViolation("A referral is accepted by its receiver: set Task.owner", expression=["Task.owner"])


REFERRAL_RULES = TaskRules(
    machine=REFERRAL_MACHINE,
    roles=referral_roles,
    guards={"complete": _outcome_exists, "accept": _receiver_known},
    parties_may_edit=frozenset({OWNER, REQUESTER, DESK, SYSTEM}),
)

REFERRAL_WORKFLOW = Workflow(REFERRAL_RULES, is_referral_task)

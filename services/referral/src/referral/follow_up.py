"""Follow-up tasks of a downward referral (下转): the care plan becomes work for the clinic.

A downward referral carries its care plan: a CarePlan in `ServiceRequest.supportingInfo` (or, for
simple cases, `patientInstruction`). When the receiving township center or village clinic accepts
it, every planned activity of the CarePlan becomes a follow-up Task owned by the clinic,
requested by the sender, `partOf` the referral Task, so the county hospital sees each one's
progress and completion.
"""

from typing import Any

from fhirkit.errors import BusinessRuleViolation
from fhirkit.search.values import format_instant
from fhirkit.workflow.machine import StateMachine, TaskRules, Workflow, transition
from referral import workflow

BUSINESS_STATUS_SYSTEM = f"{workflow.BASE}/CodeSystem/follow-up-business-status"
OWNER, REQUESTER = workflow.OWNER, workflow.REQUESTER



FOLLOW_UP_MACHINE = StateMachine(
    name="follow-up",
    initial=frozenset({"requested"}),
    business_status_system=BUSINESS_STATUS_SYSTEM,
    transitions=(
        transition("accept", {"requested"}, "accepted", {OWNER}, business_status="planned"),
        transition("start", {"requested", "accepted"}, "in-progress", {OWNER}, business_status="in-progress"),
        transition("complete", {"requested", "accepted", "in-progress"}, "completed", {OWNER}, business_status="done"),
        transition("reject", {"requested"}, "rejected", {OWNER}, requires_reason=True, business_status="declined"),
        transition("cancel", {"requested", "accepted", "in-progress"}, "cancelled", {REQUESTER}, requires_reason=True,
           business_status="cancelled"),
    ),
)


def is_follow_up_task(task: dict[str, Any]) -> bool:
    return any(c.get("system") == workflow.TASK_CODE_SYSTEM and c.get("code") == "follow-up"
               for c in (task.get("code") or {}).get("coding") or [])


async def follow_up_roles(repo: Any, task: dict[str, Any], previous: dict[str, Any] | None) -> frozenset[str]:
    organization = getattr(repo.caller, "organization", None)
    current = previous or task
    roles = set()
    if organization and organization == workflow.reference_of(current.get("owner")):
        roles.add(OWNER)
    if organization and organization == workflow.reference_of(current.get("requester")):
        roles.add(REQUESTER)
    return frozenset(roles)


FOLLOW_UP_WORKFLOW = Workflow(
    TaskRules(machine=FOLLOW_UP_MACHINE, roles=follow_up_roles, parties_may_edit=frozenset({OWNER, REQUESTER})),
    is_follow_up_task,
)


def care_plan_reference(request: dict[str, Any]) -> str | None:
    for item in request.get("supportingInfo") or []:
        reference = workflow.reference_of(item)
        if reference and reference.startswith("CarePlan/"):
            return reference
    return None


def require_care_plan(request: dict[str, Any]) -> None:
    if care_plan_reference(request) is None and not request.get("patientInstruction"):
        raise BusinessRuleViolation(
            "A downward referral carries its care plan: a CarePlan in supportingInfo or patientInstruction",
            expression=["ServiceRequest.supportingInfo"],
        )


async def create_follow_ups(repo: Any, referral_task: dict[str, Any], request: dict[str, Any]) -> int:
    """One follow-up Task per planned activity of the referral's CarePlan."""
    reference = care_plan_reference(request)
    if reference is None:
        return 0
    plan = (await repo.read("CarePlan", reference.split("/", 1)[1])).parsed()
    now = format_instant(repo.config.clock())
    created = 0
    for activity in plan.get("activity") or []:
        detail = activity.get("detail") or {}
        description = detail.get("description") or (detail.get("code") or {}).get("text")
        if not description:
            continue
        task: dict[str, Any] = {
            "resourceType": "Task",
            "status": "requested",
            "intent": "plan",
            "code": {"coding": [{"system": workflow.TASK_CODE_SYSTEM, "code": "follow-up", "display": "随访"}]},
            "description": description,
            "focus": {"reference": reference},
            "basedOn": [{"reference": reference}],
            "partOf": [{"reference": f"Task/{referral_task['id']}"}],
            "for": referral_task["for"],
            "requester": request["requester"],
            "owner": referral_task["owner"],
            "authoredOn": now,
        }
        if isinstance(detail.get("scheduledPeriod"), dict):
            task["restriction"] = {"period": detail["scheduledPeriod"]}
        await repo.create(task)
        created += 1
    return created

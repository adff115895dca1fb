"""The invited party's own operations: `$forward` (pass the invitation up to a city or provincial
partner: a new hop, built by the shared `fhirkit.workflow.onward`) and `$assign-practitioner`
(name the consultant, whose specialty and title are checked against the request)."""

from typing import Any

from fhirkit.api import responses
from fhirkit.api.interactions import Result
from fhirkit.api.router import OperationCall
from fhirkit.errors import BusinessRuleViolation, Forbidden, InvalidRequest
from fhirkit.search.values import format_instant
from fhirkit.workflow.machine import reference_of
from fhirkit.workflow.onward import Hop, forward_hop, owner_parameter
from fhirkit.workflow.operations import require_if_match
from servicekit.tiers import place
from telemedicine import invitation, report, workflow
from telemedicine.vocabulary import BUSINESS_STATUS_SYSTEM, TITLE_GRADE, TITLE_SYSTEM, codes

FORWARDABLE = ("requested", "received", "rejected")
ASSIGNABLE = ("requested", "received", "accepted", "on-hold")


async def _task_and_roles(call: OperationCall) -> tuple[dict[str, Any], frozenset[str]]:
    task = (await call.repo.read("Task", call.resource_id or "")).parsed()
    if not workflow.is_telemedicine_task(task):
        raise BusinessRuleViolation("Not a telemedicine Task", expression=["Task.code"])
    return task, await workflow.telemedicine_roles(call.repo, task, task)


async def task_forward(call: OperationCall) -> Result:
    """An open invitation is declined here (with the reason) and sent on in one call; a declined
    one is sent on."""
    version = require_if_match(call)
    task, roles = await _task_and_roles(call)
    if workflow.OWNER not in roles:
        raise Forbidden("Only the invited party forwards an invitation")
    if task.get("status") not in FORWARDABLE:
        raise BusinessRuleViolation(
            f"$forward passes on an invitation that is {', '.join(FORWARDABLE)}; this one is '{task.get('status')}'",
            expression=["Task.status"],
        )
    reason = call.parameter("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise BusinessRuleViolation("$forward needs a reason (why the invited party passes it on)",
                                    expression=["Task.statusReason"])
    target = owner_parameter(call)
    await _check_upward(call.repo.config.references, reference_of(task.get("owner")) or "", target)
    changes: dict[str, Any] = {}
    if task.get("status") != "rejected":
        changes = {"status": "rejected", "statusReason": {"text": reason}}
    hop = Hop(business_status_system=BUSINESS_STATUS_SYSTEM, business_status="forwarded",
              note_label="远程会诊转邀 forwarded", old_task_changes=changes)
    return await forward_hop(call, task, version, target, hop)


async def _check_upward(directory: Any, current: str, target: str) -> None:
    here, there = await place(directory, current), await place(directory, target)
    if here.rank is None or there.rank is None or there.rank <= here.rank:
        raise BusinessRuleViolation(
            f"$forward goes up to a higher tier: {target} ({there.code}) is not above {current} ({here.code})",
            expression=["Task.owner"],
        )


async def task_assign_practitioner(call: OperationCall) -> Result:
    version = require_if_match(call)
    task, roles = await _task_and_roles(call)
    if workflow.OWNER not in roles:
        raise Forbidden("Only the invited party assigns its practitioner")
    if task.get("status") not in ASSIGNABLE:
        raise BusinessRuleViolation(
            f"A practitioner is assigned while the invitation is {', '.join(ASSIGNABLE)}; this one is "
            f"'{task.get('status')}'",
            expression=["Task.status"],
        )
    practitioner = call.parameter("practitioner")
    role_reference = reference_of(practitioner) if isinstance(practitioner, dict) else practitioner
    if not isinstance(role_reference, str) or not role_reference.startswith("PractitionerRole/"):
        raise InvalidRequest("$assign-practitioner needs 'practitioner' as a PractitionerRole reference (valueReference)")
    request = await report.focus_request(call.repo, task)
    await check_qualification(call.repo.config.references, role_reference, request, reference_of(task.get("owner")))
    others = [p for p in request.get("performer") or [] if not str(reference_of(p)).startswith("PractitionerRole/")]
    await call.repo.update("ServiceRequest", request["id"], {**request, "performer": [*others, {"reference": role_reference}]})
    assigned = {**task, "lastModified": format_instant(call.repo.config.clock()),
                "businessStatus": {"coding": [{"system": BUSINESS_STATUS_SYSTEM, "code": "practitioner-assigned"}]}}
    outcome = await call.repo.update("Task", task["id"], assigned, if_match=version)
    headers = responses.resource_headers(outcome.stored, call.options.base)
    return Result(200, outcome.stored.content, headers, outcome.stored)


async def check_qualification(directory: Any, role_reference: str, request: dict[str, Any], owner: str | None) -> None:
    """The consultant works at the invited party, in the specialty wanted, with at least the title wanted."""
    role = await directory.read("PractitionerRole", role_reference.split("/", 1)[1])
    if role is None or role.get("active") is False:
        raise BusinessRuleViolation(f"{role_reference} is not an active PractitionerRole", expression=["practitioner"])
    if reference_of(role.get("organization")) != owner:
        raise BusinessRuleViolation(f"{role_reference} does not work at the invited party {owner}",
                                    expression=["practitioner"])
    wanted = set(invitation.wanted_specialties(request))
    has = set(codes(role.get("specialty"), invitation.SPECIALTY_SYSTEM))
    if wanted and not wanted & has:
        raise BusinessRuleViolation(
            f"{role_reference} practises {', '.join(sorted(has)) or 'no recorded specialty'}; the request wants "
            f"{', '.join(sorted(wanted))}",
            expression=["practitioner"],
        )
    await _check_title(directory, role, role_reference, invitation.wanted_grade(request))


async def _check_title(directory: Any, role: dict[str, Any], role_reference: str, wanted: int | None) -> None:
    if wanted is None:
        return
    practitioner = reference_of(role.get("practitioner")) or ""
    person = await directory.read("Practitioner", practitioner.split("/", 1)[-1]) if practitioner else None
    titles = [c for q in (person or {}).get("qualification") or [] for c in codes(q.get("code"), TITLE_SYSTEM)]
    grade = max((TITLE_GRADE.get(t, -1) for t in titles), default=-1)
    if grade < wanted:
        wanted_titles = sorted(code for code, g in TITLE_GRADE.items() if g == wanted)
        raise BusinessRuleViolation(
            f"{role_reference} ({practitioner}) holds {', '.join(titles) or 'no recorded title'}; the request wants "
            f"at least the grade of {', '.join(wanted_titles)}",
            expression=["practitioner"],
        )

"""Referrals that move on: `$forward` (a rejected referral sent onward, a new hop in the chain)
and `$assign` (the county referral desk gives an unaddressed referral its receiver).

Every hop is a new ServiceRequest + Task sharing the chain's `requisition`; the new request
`replaces` the old one and the new Task is `basedOn` the old Task, whose `output` points at the
new request, so the original sender can follow every hop to the final outcome.
"""

from fhirkit.api import responses
from fhirkit.api.interactions import Result
from fhirkit.api.router import OperationCall
from fhirkit.errors import BusinessRuleViolation, Forbidden
from fhirkit.search.values import format_instant
from fhirkit.workflow.onward import Hop, forward_hop, owner_parameter
from fhirkit.workflow.operations import require_if_match
from referral import workflow

FORWARD = Hop(business_status_system=workflow.BUSINESS_STATUS_SYSTEM, note_label="转诊转发 forwarded",
              output_label="onward referral")


async def task_forward(call: OperationCall) -> Result:
    version = require_if_match(call)
    task = (await call.repo.read("Task", call.resource_id or "")).parsed()
    roles = await workflow.referral_roles(call.repo, task, task)
    if task.get("status") != "rejected":
        raise BusinessRuleViolation(
            f"$forward sends a rejected referral onward; this one is '{task.get('status')}'",
            expression=["Task.status"],
        )
    if not roles & {workflow.OWNER, workflow.DESK} and getattr(call.caller, "level", None) != "county":
        raise Forbidden("Only the receiver that rejected it or the county referral desk may forward a referral")
    return await forward_hop(call, task, version, owner_parameter(call), FORWARD)


async def task_assign(call: OperationCall) -> Result:
    version = require_if_match(call)
    task = (await call.repo.read("Task", call.resource_id or "")).parsed()
    roles = await workflow.referral_roles(call.repo, task, task)
    if workflow.DESK not in roles:
        raise Forbidden("Only the county referral desk assigns a referral that has no receiver")
    if task.get("status") not in ("requested", "received"):
        raise BusinessRuleViolation(f"Only a waiting referral can be assigned; this one is '{task.get('status')}'")
    target = owner_parameter(call)
    focus = (workflow.reference_of(task.get("focus")) or "").split("/", 1)[-1]
    request = (await call.repo.read("ServiceRequest", focus)).parsed()
    # The Task first: once the request names its receiver the desk no longer sees it (access
    # policy), and the Task's focus must still resolve when the Task is written.
    assigned = {**task, "owner": {"reference": target}, "lastModified": format_instant(call.repo.config.clock())}
    outcome = await call.repo.update("Task", task["id"], assigned, if_match=version)
    await call.repo.update("ServiceRequest", request["id"], {**request, "performer": [{"reference": target}]})
    headers = responses.resource_headers(outcome.stored, call.options.base)
    return Result(200, outcome.stored.content, headers, outcome.stored)

"""Referrals that move on: `$forward` (a rejected referral sent onward, a new hop in the chain)
and `$assign` (the county referral desk gives an unaddressed referral its receiver).

Every hop is a new ServiceRequest + Task sharing the chain's `requisition`; the new request
`replaces` the old one and the new Task is `basedOn` the old Task, whose `output` points at the
new request, so the original sender can follow every hop to the final outcome.
"""

import copy
from typing import Any

from fhirkit.api import responses
from fhirkit.api.interactions import Result
from fhirkit.api.router import OperationCall
from fhirkit.errors import BusinessRuleViolation, Forbidden, InvalidRequest
from fhirkit.search.values import format_instant
from fhirkit.workflow.operations import require_if_match
from referral import workflow

SERVER_FIELDS = ("id", "meta", "text")


def _target(call: OperationCall) -> str:
    owner = call.parameter("owner")
    reference = owner.get("reference") if isinstance(owner, dict) else owner
    if not isinstance(reference, str) or not reference.startswith("Organization/"):
        raise InvalidRequest("This operation needs 'owner' as an Organization reference (valueReference)")
    return reference


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
    target = _target(call)
    focus = workflow.reference_of(task.get("focus")) or ""
    request = (await call.repo.read("ServiceRequest", focus.split("/", 1)[-1])).parsed()
    onward_request = await _create_onward_request(call, request, target)
    onward_task = await _create_onward_task(call, task, onward_request, target)
    forwarded = copy.deepcopy(task)
    forwarded.setdefault("output", []).append(
        {"type": {"text": "onward referral"}, "valueReference": {"reference": f"ServiceRequest/{onward_request['id']}"}}
    )
    forwarded["businessStatus"] = {"coding": [{"system": workflow.BUSINESS_STATUS_SYSTEM, "code": "referred-onward"}]}
    forwarded["lastModified"] = format_instant(call.repo.config.clock())
    await call.repo.update("Task", task["id"], forwarded, if_match=version)
    stored = await call.repo.read("Task", onward_task["id"])
    headers = responses.resource_headers(stored, call.options.base, location=True)
    return Result(201, stored.content, headers, stored)


async def _create_onward_request(call: OperationCall, request: dict[str, Any], target: str) -> dict[str, Any]:
    onward = {k: v for k, v in copy.deepcopy(request).items() if k not in SERVER_FIELDS}
    onward["performer"] = [{"reference": target}]
    onward["replaces"] = [{"reference": f"ServiceRequest/{request['id']}"}]
    onward["status"] = "active"
    reason = call.parameter("reason")
    if isinstance(reason, str) and reason:
        onward.setdefault("note", []).append({"text": f"转诊转发 forwarded: {reason}"})
    outcome = await call.repo.create(onward)
    return outcome.stored.parsed()


async def _create_onward_task(
    call: OperationCall, task: dict[str, Any], request: dict[str, Any], target: str
) -> dict[str, Any]:
    keep = ("code", "for", "requester", "priority", "intent", "input", "restriction", "groupIdentifier")
    onward = {k: copy.deepcopy(v) for k, v in task.items() if k in keep}
    now = format_instant(call.repo.config.clock())
    onward.update({
        "resourceType": "Task",
        "status": "requested",
        "intent": task.get("intent", "order"),
        "focus": {"reference": f"ServiceRequest/{request['id']}"},
        "owner": {"reference": target},
        "basedOn": [{"reference": f"Task/{task['id']}"}],
        "authoredOn": now,
        "lastModified": now,
        "businessStatus": {"coding": [{"system": workflow.BUSINESS_STATUS_SYSTEM, "code": "submitted"}]},
    })
    outcome = await call.repo.create(onward)
    return outcome.stored.parsed()


async def task_assign(call: OperationCall) -> Result:
    version = require_if_match(call)
    task = (await call.repo.read("Task", call.resource_id or "")).parsed()
    roles = await workflow.referral_roles(call.repo, task, task)
    if workflow.DESK not in roles:
        raise Forbidden("Only the county referral desk assigns a referral that has no receiver")
    if task.get("status") not in ("requested", "received"):
        raise BusinessRuleViolation(f"Only a waiting referral can be assigned; this one is '{task.get('status')}'")
    target = _target(call)
    focus = (workflow.reference_of(task.get("focus")) or "").split("/", 1)[-1]
    request = (await call.repo.read("ServiceRequest", focus)).parsed()
    await call.repo.update("ServiceRequest", request["id"], {**request, "performer": [{"reference": target}]})
    assigned = {**task, "owner": {"reference": target}, "lastModified": format_instant(call.repo.config.clock())}
    outcome = await call.repo.update("Task", task["id"], assigned, if_match=version)
    headers = responses.resource_headers(outcome.stored, call.options.base)
    return Result(200, outcome.stored.content, headers, outcome.stored)

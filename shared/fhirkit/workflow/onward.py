"""Moving a request on to the next party: a new hop of a chain (referral `$forward`, telemedicine
`$forward`).

Every hop is a new ServiceRequest + Task sharing the chain's `requisition`; the new request
`replaces` the old one and the new Task is `basedOn` the old Task, whose `output` points at the
new request, so the original requester can follow every hop to the final outcome. Which Tasks
may be forwarded, by whom and where to is the calling service's rule; this module only builds
the hop.
"""

import copy
from dataclasses import dataclass
from typing import Any

from fhirkit.api import responses
from fhirkit.api.interactions import Result
from fhirkit.api.router import OperationCall
from fhirkit.errors import InvalidRequest
from fhirkit.search.values import format_instant
from fhirkit.workflow.machine import reference_of

SERVER_FIELDS = ("id", "meta", "text")
TASK_FIELDS_KEPT = ("code", "for", "requester", "priority", "intent", "input", "restriction", "groupIdentifier")


def owner_parameter(call: OperationCall) -> str:
    """The operation's `owner` input: the Organization the request moves to."""
    owner = call.parameter("owner")
    reference = owner.get("reference") if isinstance(owner, dict) else owner
    if not isinstance(reference, str) or not reference.startswith("Organization/"):
        raise InvalidRequest("This operation needs 'owner' as an Organization reference (valueReference)")
    return reference


@dataclass(frozen=True)
class Hop:
    business_status_system: str
    business_status: str = "referred-onward"
    note_label: str = "forwarded"
    output_label: str = "onward request"
    # Fields the old Task takes in the same write (e.g. status `rejected` with the reason).
    old_task_changes: dict[str, Any] | None = None


async def forward_hop(call: OperationCall, task: dict[str, Any], version: int, target: str, hop: Hop) -> Result:
    """Create the next hop towards `target` and mark `task` (at `version`) as moved onward."""
    focus = reference_of(task.get("focus")) or ""
    request = (await call.repo.read("ServiceRequest", focus.split("/", 1)[-1])).parsed()
    onward_request = await _create_onward_request(call, request, target, hop)
    onward_task = await _create_onward_task(call, task, onward_request, target, hop)
    forwarded = copy.deepcopy(task)
    forwarded.update(copy.deepcopy(hop.old_task_changes or {}))
    forwarded.setdefault("output", []).append(
        {"type": {"text": hop.output_label}, "valueReference": {"reference": f"ServiceRequest/{onward_request['id']}"}}
    )
    forwarded["businessStatus"] = {"coding": [{"system": hop.business_status_system, "code": hop.business_status}]}
    forwarded["lastModified"] = format_instant(call.repo.config.clock())
    await call.repo.update("Task", task["id"], forwarded, if_match=version)
    stored = await call.repo.read("Task", onward_task["id"])
    headers = responses.resource_headers(stored, call.options.base, location=True)
    return Result(201, stored.content, headers, stored)


async def _create_onward_request(
    call: OperationCall, request: dict[str, Any], target: str, hop: Hop
) -> dict[str, Any]:
    onward = {k: v for k, v in copy.deepcopy(request).items() if k not in SERVER_FIELDS}
    onward["performer"] = [{"reference": target}]
    onward["replaces"] = [{"reference": f"ServiceRequest/{request['id']}"}]
    onward["status"] = "active"
    reason = call.parameter("reason")
    if isinstance(reason, str) and reason:
        onward.setdefault("note", []).append({"text": f"{hop.note_label}: {reason}"})
    outcome = await call.repo.create(onward)
    return outcome.stored.parsed()


async def _create_onward_task(
    call: OperationCall, task: dict[str, Any], request: dict[str, Any], target: str, hop: Hop
) -> dict[str, Any]:
    onward = {k: copy.deepcopy(v) for k, v in task.items() if k in TASK_FIELDS_KEPT}
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
        "businessStatus": {"coding": [{"system": hop.business_status_system, "code": "submitted"}]},
    })
    outcome = await call.repo.create(onward)
    return outcome.stored.parsed()

"""`Task/{id}/$convert-to-referral`: a teleconsultation whose answer is "the patient must come"
becomes an upward referral in one call, linked both ways.

The inviting party keeps the treatment decision (2018 rules), so it converts its completed
teleconsultation. The referral (ServiceRequest + Task) is created at the referral service through
its API, as one transaction Bundle, under the caller's own signed identity (so the referral is the
inviting party's, as if it had sent it itself); the referral service applies all its own rules.
The referral request is `basedOn` the teleconsultation request, its Task `basedOn` the
teleconsultation Task and it carries the consult report in `supportingInfo`; the teleconsultation
Task gains both referral resources in `output`.
"""

import copy
import uuid
from typing import Any

import httpx
import orjson

from fhirkit.api import responses
from fhirkit.api.interactions import Result
from fhirkit.api.router import OperationCall
from fhirkit.errors import (
    BusinessRuleViolation,
    FhirError,
    Forbidden,
    InvalidRequest,
    PreconditionFailed,
    UpstreamUnavailable,
)
from fhirkit.search.values import format_instant
from fhirkit.workflow.machine import reference_of
from fhirkit.workflow.operations import require_if_match
from servicekit.identity import IDENTITY_HEADER, sign_identity
from telemedicine import report, workflow
from telemedicine.vocabulary import BASE, TELECONSULTATION, task_code

REFERRAL_CATEGORY_SYSTEM = f"{BASE}/CodeSystem/referral-category"
REFERRAL_CHAIN_SYSTEM = f"{BASE}/sid/referral-chain"
REFERRAL_SERVICE = "referral"


class ReferralRefused(FhirError):
    """The referral service's own refusal, passed on with its status."""

    def __init__(self, status: int, outcome: dict[str, Any]) -> None:
        issue = (outcome.get("issue") or [{}])[0]
        super().__init__(f"The referral service refused the referral: {issue.get('diagnostics', status)}",
                         expression=issue.get("expression") or ())
        self.status_code = status  # type: ignore[misc]
        self.issue_code = issue.get("code", "processing")  # type: ignore[misc]


async def task_convert_to_referral(call: OperationCall) -> Result:
    version = require_if_match(call)
    stored = await call.repo.read("Task", call.resource_id or "")
    if stored.version_id != version:
        # Checked before the referral exists: a stale call must not leave a referral behind.
        raise PreconditionFailed(f"Task/{stored.resource_id} is at version {stored.version_id}, not {version}")
    task = stored.parsed()
    await _check_convertible(call, task)
    request = await report.focus_request(call.repo, task)
    bundle = _referral_bundle(call, task, request)
    created = await _post_to_referral(call, bundle)
    linked = copy.deepcopy(task)
    linked.setdefault("output", []).extend([
        {"type": {"text": "referral"}, "valueReference": {"reference": created["ServiceRequest"]}},
        {"type": {"text": "referral task"}, "valueReference": {"reference": created["Task"]}},
    ])
    linked["lastModified"] = format_instant(call.repo.config.clock())
    outcome = await call.repo.update("Task", task["id"], linked, if_match=version)
    headers = responses.resource_headers(outcome.stored, call.options.base)
    return Result(200, outcome.stored.content, headers, outcome.stored)


async def _check_convertible(call: OperationCall, task: dict[str, Any]) -> None:
    if task_code(task) != TELECONSULTATION:
        raise BusinessRuleViolation("Only a teleconsultation converts into a referral", expression=["Task.code"])
    roles = await workflow.telemedicine_roles(call.repo, task, task)
    if workflow.REQUESTER not in roles:
        raise Forbidden("The inviting party, which keeps the treatment decision, converts its teleconsultation")
    if task.get("status") != "completed":
        raise BusinessRuleViolation(
            f"A teleconsultation converts into a referral once its opinion is issued (completed); this one is "
            f"'{task.get('status')}'",
            expression=["Task.status"],
        )
    if any((o.get("type") or {}).get("text") == "referral" for o in task.get("output") or []):
        raise BusinessRuleViolation("This teleconsultation has already been converted into a referral",
                                    expression=["Task.output"])


def _referral_bundle(call: OperationCall, task: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    receiver = _receiver(call, task)
    reason = call.parameter("reason")
    request_url = f"urn:uuid:{uuid.uuid4()}"
    reports = [o["valueReference"] for o in task.get("output") or []
               if str(reference_of(o.get("valueReference"))).startswith(("DocumentReference/", "Composition/"))]
    referral_request: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "category": [{"coding": [{"system": REFERRAL_CATEGORY_SYSTEM, "code": "upward-referral", "display": "上转"}]}],
        "priority": request.get("priority") or "routine",
        "subject": request["subject"],
        "requester": task["requester"],
        "performer": [{"reference": receiver}],
        "reasonCode": request.get("reasonCode") or [],
        "reasonReference": request.get("reasonReference") or [],
        "basedOn": [{"reference": f"ServiceRequest/{request['id']}"}],
        "requisition": {"system": REFERRAL_CHAIN_SYSTEM, "value": uuid.uuid4().hex},
        "supportingInfo": reports,
        "note": [{"text": f"远程会诊转转诊 from teleconsultation Task/{task['id']}"
                          + (f": {reason}" if isinstance(reason, str) and reason else "")}],
    }
    referral_request = {k: v for k, v in referral_request.items() if v not in ([], None)}
    referral_task = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "priority": referral_request["priority"],
        "code": {"coding": [{"system": f"{BASE}/CodeSystem/task-code", "code": "referral"}]},
        "focus": {"reference": request_url},
        "for": request["subject"],
        "requester": task["requester"],
        "owner": {"reference": receiver},
        "basedOn": [{"reference": f"Task/{task['id']}"}],
    }
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": request_url, "resource": referral_request, "request": {"method": "POST", "url": "ServiceRequest"}},
        {"resource": referral_task, "request": {"method": "POST", "url": "Task"}},
    ]}


def _receiver(call: OperationCall, task: dict[str, Any]) -> str:
    given = call.parameter("receiver")
    receiver = reference_of(given) if isinstance(given, dict) else given
    receiver = receiver or reference_of(task.get("owner"))
    if not isinstance(receiver, str) or not receiver.startswith("Organization/"):
        raise InvalidRequest("'receiver' is an Organization reference (default: the invited party)")
    return receiver


async def _post_to_referral(call: OperationCall, bundle: dict[str, Any]) -> dict[str, str]:
    peers = call.repo.config.references
    headers = {IDENTITY_HEADER: sign_identity(call.caller, peers.secret), "Content-Type": "application/fhir+json"}
    try:
        response = await peers.client(REFERRAL_SERVICE).post("/fhir", content=orjson.dumps(bundle), headers=headers)
    except httpx.HTTPError as exc:
        raise UpstreamUnavailable(f"The referral service is unreachable: {type(exc).__name__}") from None
    body = orjson.loads(response.content) if response.content else {}
    if response.status_code != 200:
        if 400 <= response.status_code < 500 and body.get("resourceType") == "OperationOutcome":
            raise ReferralRefused(response.status_code, body)
        raise UpstreamUnavailable(f"The referral service answered {response.status_code} creating the referral")
    created: dict[str, str] = {}
    for entry in body.get("entry") or []:
        location = str((entry.get("response") or {}).get("location", ""))
        parts = location.split("/_history")[0].split("/")
        if len(parts) >= 2:
            created[parts[-2]] = f"{parts[-2]}/{parts[-1]}"
    if set(created) != {"ServiceRequest", "Task"}:
        raise UpstreamUnavailable("The referral service did not say where it created the referral")
    return created

"""`POST Observation/{id}/$acknowledge-critical`: the producing center closes a critical value's loop
(危急值闭环).

Under the 危急值报告制度 (医疗质量安全核心制度要点, 2018) the department that finds a critical value
(here the shared center that produced the result) telephones the clinical side at once and keeps
the register: result, time of the call, who called and **who received it** ("谁报告，谁记录";
the receiver keeps its own receipt register in its own HIS). The alliance's repository records
the closure that register states, so only the producer may record it: the ordering organization
cannot be told from every result (`basedOn` is optional) and its receipt register stays in its
HIS. Another organization that may read the result (a grant) is refused with 403; one that may
not read it gets 404, exactly as for a read.

Parameters: `acknowledgedBy` (Reference to the Practitioner or PractitionerRole who took the call,
known to the directory), optional `acknowledgedAt` (dateTime, default now; not in the future, not
before the result's effective time), optional `note` (string). The Observation gets the extension
`…/StructureDefinition/critical-value-acknowledgement` through an ordinary update: a new version
(history kept), `If-Match` honoured (412 when stale), the result's hooks re-run (the recognition
index stops calling it critical-unacknowledged), a Provenance naming the version, and the
gateway's audit trail records the call. A critical value is closed once: calling again answers
the current version unchanged (no new version, no new Provenance), also when two calls race.
"""

import copy
from typing import Any

from fhirkit.api import responses
from fhirkit.api.interactions import Result, parse_if_match
from fhirkit.api.router import OperationCall
from fhirkit.errors import BusinessRuleViolation, Forbidden, InvalidRequest, PreconditionFailed
from fhirkit.search.values import date_range, format_instant
from fhirkit.store.repository import StoredResource
from results_sharing.results import acknowledged, critical_interpretation, effective_time
from results_sharing.vocabulary import CRITICAL_ACKNOWLEDGEMENT, WITHDRAWN_STATUSES, reference_of

DEFINITION = "http://county-alliance.org/fhir/OperationDefinition/Observation-acknowledge-critical"
PROVENANCE_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
RECEIVERS = ("Practitioner/", "PractitionerRole/")
CLOCK_SKEW_MICROS = 5 * 60 * 1_000_000  # an acknowledgedAt this far ahead of our clock is still "now"
NOTE_MAX = 1000


async def acknowledge_critical(call: OperationCall) -> Result:
    if_match = parse_if_match(call.request.headers.get("if-match"))
    receiver, at, note = _parameters(call)
    stored = await call.repo.read("Observation", call.resource_id or "")  # 404 unseen, 410 deleted
    observation = stored.parsed()
    _require_producer(call.caller, observation)
    _require_open_critical_value(observation)
    if if_match is not None and if_match != stored.version_id:
        raise PreconditionFailed(f"Observation/{stored.resource_id} is at version {stored.version_id}, "
                                 f"not {if_match} (If-Match)")
    if acknowledged(observation):
        return _answer(call, stored)  # closed already: nothing to write
    acknowledged_at = _acknowledged_at(call, at, observation)
    await _require_known_receiver(call, receiver)
    body = with_acknowledgement(observation, receiver, acknowledged_at, note)
    try:
        outcome = await call.repo.update("Observation", stored.resource_id, body, if_match=stored.version_id)
    except PreconditionFailed:
        # Another call wrote first (PostgreSQL: we read before its commit). If it closed the loop,
        # this call is answered like any later one; a client's own If-Match stays strict.
        current = await call.repo.read("Observation", stored.resource_id)
        if if_match is not None or not acknowledged(current.parsed()):
            raise
        return _answer(call, current)
    await call.repo.create(provenance(outcome.stored, stored.version_id, call.caller, receiver, acknowledged_at,
                                      call.repo.config.clock()))
    return _answer(call, outcome.stored)


def _answer(call: OperationCall, stored: StoredResource) -> Result:
    return Result(200, stored.content, responses.resource_headers(stored, call.options.base), stored)


# --- parameters ---------------------------------------------------------------------------------

def _parameters(call: OperationCall) -> tuple[dict[str, Any], str | None, str | None]:
    if not isinstance(call.body, dict) or call.body.get("resourceType") != "Parameters":
        raise InvalidRequest("$acknowledge-critical takes a Parameters body with 'acknowledgedBy'")
    receiver = call.parameter("acknowledgedBy")
    reference = reference_of(receiver)
    if reference is None or not reference.startswith(RECEIVERS) or reference.count("/") != 1:
        raise InvalidRequest("acknowledgedBy is required: a valueReference to the Practitioner or PractitionerRole "
                             "who received the critical value", expression=["Parameters.parameter"])
    at = call.parameter("acknowledgedAt")
    if at is not None and (not isinstance(at, str) or len(at) <= 10 or date_range(at) is None):
        raise InvalidRequest("acknowledgedAt must be a valueDateTime with a time of day")
    note = call.parameter("note")
    if note is not None and (not isinstance(note, str) or not note.strip() or len(note) > NOTE_MAX):
        raise InvalidRequest(f"note must be a valueString of at most {NOTE_MAX} characters")
    return {"reference": reference, **({"display": receiver["display"]} if receiver.get("display") else {})}, at, note


def _acknowledged_at(call: OperationCall, at: str | None, observation: dict[str, Any]) -> str:
    now = call.repo.config.clock()
    if at is None:
        return format_instant(now)
    bounds = date_range(at)
    assert bounds is not None  # checked in _parameters
    moment = bounds[0]
    if moment > now + CLOCK_SKEW_MICROS:
        raise BusinessRuleViolation("acknowledgedAt is in the future", expression=["Parameters.parameter"])
    effective = effective_time(observation)
    if effective is not None and moment < effective:
        raise BusinessRuleViolation("acknowledgedAt is before the result was taken (effective[x])",
                                    expression=["Parameters.parameter"])
    return at


async def _require_known_receiver(call: OperationCall, receiver: dict[str, Any]) -> None:
    resource_type, resource_id = receiver["reference"].split("/", 1)
    if not await call.repo.config.references.exists(resource_type, resource_id):
        raise BusinessRuleViolation(f"acknowledgedBy {receiver['reference'][:80]} is not known to the directory",
                                    expression=["Parameters.parameter"])


# --- rules --------------------------------------------------------------------------------------

def producer_of(observation: dict[str, Any]) -> str | None:
    return next((r for r in map(reference_of, observation.get("performer") or [])
                 if r and r.startswith("Organization/")), None)


def _require_producer(caller: Any, observation: dict[str, Any]) -> None:
    organization = getattr(caller, "organization", None)
    producer = producer_of(observation)
    if producer is None or organization != producer:
        raise Forbidden(f"Only the producing center ({producer or 'none named in performer'}) records the receipt "
                        "of its critical value")


def _require_open_critical_value(observation: dict[str, Any]) -> None:
    if not critical_interpretation(observation):
        raise BusinessRuleViolation("The Observation is no critical value: its interpretation is not AA, HH or LL",
                                    expression=["Observation.interpretation"])
    if observation.get("status") in WITHDRAWN_STATUSES:
        raise BusinessRuleViolation(f"The Observation is {observation.get('status')}: there is nothing to acknowledge",
                                    expression=["Observation.status"])


# --- what is written ----------------------------------------------------------------------------

def with_acknowledgement(observation: dict[str, Any], receiver: dict[str, Any], at: str,
                         note: str | None) -> dict[str, Any]:
    body = copy.deepcopy(observation)
    parts: list[dict[str, Any]] = [{"url": "acknowledgedBy", "valueReference": receiver},
                                   {"url": "acknowledgedAt", "valueDateTime": at}]
    if note:
        parts.append({"url": "note", "valueString": note.strip()})
    kept = [e for e in body.get("extension") or [] if e.get("url") != CRITICAL_ACKNOWLEDGEMENT]
    body["extension"] = [*kept, {"url": CRITICAL_ACKNOWLEDGEMENT, "extension": parts}]
    return body


def provenance(stored: StoredResource, previous_version: int, caller: Any, receiver: dict[str, Any],
               acknowledged_at: str, now: int) -> dict[str, Any]:
    """Who recorded the closure (the center), who received the call, and which version it made."""
    observation = f"Observation/{stored.resource_id}"
    return {
        "resourceType": "Provenance",
        "target": [{"reference": f"{observation}/_history/{stored.version_id}"}],
        "occurredDateTime": acknowledged_at,
        "recorded": format_instant(now),
        "reason": [{"coding": [{"system": ACT_REASON, "code": "PATSFTY", "display": "patient safety"}],
                    "text": "危急值闭环"}],
        "activity": {"coding": [{"system": DATA_OPERATION, "code": "UPDATE"}],
                     "text": "$acknowledge-critical: 危急值接收确认"},
        "agent": [
            {"type": {"coding": [{"system": PROVENANCE_PARTICIPANT, "code": "author"}]},
             "who": {"reference": caller.organization}},
            {"type": {"coding": [{"system": PARTICIPATION, "code": "RCV", "display": "receiver"}]},
             "who": receiver},
        ],
        "entity": [{"role": "revision", "what": {"reference": f"{observation}/_history/{previous_version}"}}],
    }

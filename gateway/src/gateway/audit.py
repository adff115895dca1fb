"""Every FHIR request leaves an `AuditEvent` (IHE BALP style) in the platform's audit repository.

The request path only notes what happened (who, what, outcome, the response bytes); a writer task
turns the notes into AuditEvents and stores them in batches, one transaction per batch, so the
hot path pays for a queue append and not for a database write. A note waits at most
`flush_seconds` (50 ms) before it is written; on shutdown the queue is drained. What is written:

* `type` rest, `subtype` the interaction, `action` C/R/U/D/E, `outcome` 0/4/8, `recorded`;
* agents: the client (`who.identifier`) and its organization (`who.reference`), the requestor;
* entities: the resource or query asked for, and every patient whose data the answer carried;
* break-the-glass: `purposeOfEvent` BTG with the stated reason, and the organizations keeping the
  patient's record (managing organization, else the assigners of its record numbers) as
  entities, so that they find the emergency access in their audit view.

Security events go through the same writer: every token request (DICOM 110114 User
Authentication, subtype Login; success or refusal, the client as claimed, its organization when it
is registered, the source address, never the secret or the assertion) and every `alliance client`
command (DICOM 110113 Security Alert for changes, rest/search-type for listing).

Logs never carry patient identifiers; the AuditEvents do, which is why they are access-controlled.
"""

import asyncio
import base64
import dataclasses
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from fhirkit.search.values import format_instant
from fhirkit.store.repository import Repository, StoreConfig
from gateway import audit_chain
from servicekit.db import Database

log = logging.getLogger("alliance.audit")

EVENT_TYPE = {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest",
              "display": "RESTful Operation"}
INTERACTIONS = "http://hl7.org/fhir/restful-interaction"
SOURCE_TYPE = {"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4",
               "display": "Application Server"}
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
OBJECT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
CLIENT_SYSTEM = "http://county-alliance.org/fhir/sid/api-client"
PATIENT_ELEMENTS = ("subject", "patient", "for", "beneficiary")
MAX_PATIENTS = 50
# The writer lets the requests in every few notes as it builds a batch's AuditEvents (and the
# store as it indexes them): a batch of some forty notes built in one go held the event loop for
# milliseconds, which the requests arriving meanwhile waited out (a tenth of $recognition-check's p95).
YIELD_EVERY = 8
MAX_SCANNED_BYTES = 4 * 1024 * 1024
ACTIONS = {"create": "C", "read": "R", "vread": "R", "history-instance": "R", "history-type": "R",
           "search-type": "R", "update": "U", "patch": "U", "delete": "D"}


@dataclass
class AccessNote:
    """What the request path knows about one request, taken as it finishes."""

    method: str
    segments: list[str]
    query: str
    status: int
    client_id: str
    organization: str
    recorded: int
    request_id: str | None = None
    address: str | None = None
    break_glass: str | None = None
    body: bytes = b""
    diagnostics: str | None = None
    patients: set[str] = field(default_factory=set)
    written: str | None = None  # what a create wrote (`Type/id`): its path names only the type


class AuditTrail:
    def __init__(
        self,
        database: Database,
        store: StoreConfig,
        *,
        custodians_of: Callable[[str], Awaitable[list[str]]] | None = None,
        flush_seconds: float = 0.05,
        batch_size: int = 200,
    ) -> None:
        self.database = database
        # The audit's own writes announce nothing (no outbox events): no service reacts to them,
        # and an event per request would double the writer's work.
        self.store = dataclasses.replace(store, hooks={})
        self.custodians_of = custodians_of
        self.flush_seconds = flush_seconds
        self.batch_size = batch_size
        self.queue: asyncio.Queue[Note | None] = asyncio.Queue()  # None: stop after what is queued
        self._task: asyncio.Task[None] | None = None
        self._in_flight = 0
        self._stopping = False

    def note(self, note: "Note") -> None:
        self.queue.put_nowait(note)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def stop(self) -> None:
        """Write everything noted, then end the writer. It is not cancelled: a batch cut off in
        the middle of its transaction would leave notes unwritten."""
        if self._task is not None:
            self.queue.put_nowait(None)
            await self._task
        await self.flush()

    async def flush(self) -> None:
        """Write everything noted so far, including a batch the writer is holding (tests call this
        before reading the audit)."""
        while self._in_flight:
            await asyncio.sleep(0.005)
        while batch := self._take(self.batch_size):
            await self._write(batch)

    def _take(self, count: int) -> list["Note"]:
        batch: list[Note] = []
        while len(batch) < count and not self.queue.empty():
            note = self.queue.get_nowait()
            if note is None:
                self._stopping = True
                break
            batch.append(note)
        return batch

    async def _run(self) -> None:
        while not self._stopping:
            first = await self.queue.get()
            if first is None:
                return
            self._in_flight += 1
            try:
                await asyncio.sleep(self.flush_seconds)
                await self._write_or_retry([first, *self._take(self.batch_size - 1)])
            finally:
                self._in_flight -= 1

    async def _write_or_retry(self, batch: list["Note"]) -> None:
        try:
            await self._write(batch)
            return
        except Exception:  # the writer must outlive a bad batch
            log.exception("audit batch of %d failed; writing its notes one by one", len(batch))
        for note in batch:  # one bad note (unstorable text) must not hold back the others
            for attempt in range(3):
                try:
                    await self._write([note])
                    break
                except Exception:
                    await asyncio.sleep(0.5 * (attempt + 1))
            else:
                log.error("an audit note of request %s could not be stored", note.request_id)

    async def _write(self, batch: list["Note"]) -> None:
        events = []
        for n, note in enumerate(batch, 1):
            events += await self._events(note)
            if n % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # let requests in (see YIELD_EVERY)
        async with self.database.transaction(write=True) as conn:
            stored = await Repository(conn, self.store).create_records(events)
            await audit_chain.append(conn, stored)

    async def _events(self, note: "Note") -> list[dict[str, Any]]:
        """One AuditEvent per patient a search (or history, operation, bundle) touched, so that a
        patient's audit lists every query that returned their data; one for anything else."""
        if not isinstance(note, AccessNote):
            return [note.audit_event()]  # security events carry no patient
        patients = sorted(note.patients | patients_in(note))[:MAX_PATIENTS]
        groups = [[p] for p in patients] if len(patients) > 1 else [patients]
        events = []
        for group in groups:
            custodians = await self._custodians(group) if note.break_glass else []
            events.append(audit_event(note, group, custodians))
        return events

    async def _custodians(self, patients: list[str]) -> list[str]:
        found: list[str] = []
        for patient in patients:
            for organization in await self.custodians_of(patient) if self.custodians_of else []:
                if organization not in found:
                    found.append(organization)
        return found


def interaction_of(method: str, segments: list[str]) -> str:
    if not segments:
        return "transaction" if method == "POST" else "capabilities"
    if any(s.startswith("$") for s in segments):
        return "operation"
    if len(segments) == 1:
        return {"GET": "search-type", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(
            method, "operation")
    if segments[1] == "_search":
        return "search-type"
    if segments[1] == "_history":
        return "history-type"
    if len(segments) >= 3 and segments[2] == "_history":
        return "vread" if len(segments) == 4 else "history-instance"
    return {"GET": "read", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, "operation")


def audit_event(note: AccessNote, patients: list[str], custodians: list[str]) -> dict[str, Any]:
    interaction = interaction_of(note.method, note.segments)
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": EVENT_TYPE,
        "subtype": [{"system": INTERACTIONS, "code": interaction}],
        "action": ACTIONS.get(interaction, "E"),
        "recorded": format_instant(note.recorded),
        "outcome": "0" if note.status < 400 else "4" if note.status < 500 else "8",
        "agent": [_client_agent(note)],
        "source": {"observer": {"display": "county alliance gateway"}, "type": [SOURCE_TYPE]},
        "entity": _entities(note, patients, custodians),
    }
    if note.status >= 400:
        event["outcomeDesc"] = f"HTTP {note.status}" + (f": {note.diagnostics[:200]}" if note.diagnostics else "")
    if note.break_glass:
        event["purposeOfEvent"] = [{"coding": [{"system": ACT_REASON, "code": "BTG", "display": "break the glass"}],
                                    "text": note.break_glass}]
    if not event["entity"]:
        del event["entity"]
    return event


def _client_agent(note: AccessNote) -> dict[str, Any]:
    agent: dict[str, Any] = {
        "type": {"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110153",
                             "display": "Source Role ID"}]},
        "who": {**({"reference": note.organization} if note.organization else {}),
                "identifier": {"system": CLIENT_SYSTEM, "value": note.client_id}},
        "requestor": True,
    }
    if note.address:
        agent["network"] = {"address": note.address, "type": "2"}
    return agent


def _entities(note: AccessNote, patients: list[str], custodians: list[str]) -> list[dict[str, Any]]:
    entities: list[dict[str, Any]] = []
    named = note.written
    if named is None and len(note.segments) >= 2 and not note.segments[1].startswith(("$", "_")):
        named = "/".join(note.segments[:2])
    if named is not None:
        entities.append({"what": {"reference": named},
                         "type": {"system": OBJECT_TYPE, "code": "2", "display": "System Object"}})
    if note.query:
        entities.append({"type": {"system": OBJECT_TYPE, "code": "2"}, "role": {"system": OBJECT_ROLE, "code": "24",
                         "display": "Query"}, "query": base64.b64encode(note.query.encode("utf-8")).decode("ascii")})
    entities += [{"what": {"reference": patient}, "type": {"system": OBJECT_TYPE, "code": "1", "display": "Person"},
                  "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"}} for patient in patients]
    entities += [{"what": {"reference": organization}, "type": {"system": OBJECT_TYPE, "code": "3"},
                  "role": {"system": OBJECT_ROLE, "code": "7", "display": "Custodian"}} for organization in custodians]
    return entities


def patients_in(note: AccessNote) -> set[str]:
    """The patients the request named or the answer carried (read from the response bytes)."""
    found: set[str] = set()
    if len(note.segments) >= 2 and note.segments[0] == "Patient" and not note.segments[1].startswith(("$", "_")):
        found.add(f"Patient/{note.segments[1]}")
    if note.status >= 400 or not note.body or len(note.body) > MAX_SCANNED_BYTES:
        return found
    try:
        # Our own services' answer: plain orjson, no depth check (that guards client input).
        content = orjson.loads(note.body)
    except orjson.JSONDecodeError:
        return found
    if isinstance(content, dict) and content.get("resourceType") == "Bundle":
        for entry in content.get("entry") or []:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict):
                found |= _patients_of(resource)
    elif isinstance(content, dict) and content.get("resourceType") == "Parameters":
        found |= _patients_in_parameters(content.get("parameter"))
    elif isinstance(content, dict):
        found |= _patients_of(content)
    return found


def _patients_in_parameters(parameters: Any) -> set[str]:
    """An operation's answer (`$recognition-check`: the patient it was about): the patients its
    parameters and their parts name, and those of the resources they carry."""
    found: set[str] = set()
    for parameter in parameters if isinstance(parameters, list) else []:
        if not isinstance(parameter, dict):
            continue
        value = parameter.get("valueReference")
        reference = value.get("reference") if isinstance(value, dict) else None
        if isinstance(reference, str) and reference.startswith("Patient/"):
            found.add(reference)
        if isinstance(parameter.get("resource"), dict):
            found |= _patients_of(parameter["resource"])
        found |= _patients_in_parameters(parameter.get("part"))
    return found


def _patients_of(resource: dict[str, Any]) -> set[str]:
    if resource.get("resourceType") == "Patient" and isinstance(resource.get("id"), str):
        return {f"Patient/{resource['id']}"}
    found = set()
    for element in PATIENT_ELEMENTS:
        value = resource.get(element)
        reference = value.get("reference") if isinstance(value, dict) else None
        if isinstance(reference, str) and reference.startswith("Patient/"):
            found.add(reference)
    return found


# --- security events: token requests and client management ---------------------------------------

DCM = "http://dicom.nema.org/resources/ontology/DCM"
USER_AUTHENTICATION = {"system": DCM, "code": "110114", "display": "User Authentication"}
LOGIN = {"system": DCM, "code": "110122", "display": "Login"}
SECURITY_ALERT = {"system": DCM, "code": "110113", "display": "Security Alert"}
SECURITY_ATTRIBUTES_CHANGED = {"system": DCM, "code": "110137", "display": "User Security Attributes Changed"}
CLIENT_MANAGEMENT = "http://county-alliance.org/fhir/CodeSystem/client-management"
OPERATOR_SYSTEM = "http://county-alliance.org/fhir/sid/os-user"
CLIENT_ACTIONS = {"create": "C", "list": "R", "disable": "U", "enable": "U", "rotate-secret": "U", "set-jwks": "U"}
_PLAIN_CLIENT_ID = re.compile(r"^[A-Za-z0-9._~:\-]{1,140}$")
_SECURITY_USER_ENTITY = {"system": OBJECT_ROLE, "code": "11", "display": "Security User Entity"}
_SECURITY_USER_GROUP = {"system": OBJECT_ROLE, "code": "12", "display": "Security User Group"}


def recorded_client_id(claimed: str | None) -> str:
    """A claimed client id is attacker input: recorded as sent when it looks like an id, else by digest."""
    if not claimed:
        return "unauthenticated"
    if _PLAIN_CLIENT_ID.match(claimed):
        return claimed
    return "sha256:" + hashlib.sha256(claimed.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _outcome(status: int) -> str:
    return "0" if status < 400 else "4" if status < 500 else "8"


@dataclass
class TokenRequestNote:
    """One request to the token endpoint, as it finished."""

    client_id: str | None  # as claimed; None when the request named none
    organization: str  # the registered client's, "" when no such client
    status: int
    recorded: int
    auth_method: str | None = None
    address: str | None = None
    request_id: str | None = None
    description: str | None = None  # the OAuth error and its description
    scope: str | None = None  # what was granted

    def audit_event(self) -> dict[str, Any]:
        client_id = recorded_client_id(self.client_id)
        who: dict[str, Any] = {"identifier": {"system": CLIENT_SYSTEM, "value": client_id}}
        if self.organization:
            who["reference"] = self.organization
        agent: dict[str, Any] = {"who": who, "requestor": True}
        if self.address:
            agent["network"] = {"address": self.address, "type": "2"}
        details = [{"type": "grant_type", "valueString": "client_credentials"}]
        if self.auth_method:
            details.append({"type": "token_endpoint_auth_method", "valueString": self.auth_method})
        if self.scope:
            details.append({"type": "scope", "valueString": self.scope})
        event: dict[str, Any] = {
            "resourceType": "AuditEvent",
            "type": USER_AUTHENTICATION,
            "subtype": [LOGIN],
            "action": "E",
            "recorded": format_instant(self.recorded),
            "outcome": _outcome(self.status),
            "agent": [agent],
            "source": {"observer": {"display": "county alliance gateway"}, "type": [SOURCE_TYPE]},
            "entity": [{"what": {"identifier": {"system": CLIENT_SYSTEM, "value": client_id}},
                        "type": {"system": OBJECT_TYPE, "code": "2", "display": "System Object"},
                        "role": _SECURITY_USER_ENTITY, "detail": details}],
        }
        if self.status >= 400:
            event["outcomeDesc"] = f"HTTP {self.status}" + (f": {self.description[:200]}" if self.description else "")
        return event


@dataclass
class ClientAdminNote:
    """One `alliance client …` command: who ran it, on which client, with what outcome."""

    action: str  # a key of CLIENT_ACTIONS
    client_id: str | None
    organization: str
    status: int  # 200 done, 404 no such client, 422 refused
    recorded: int
    operator: str  # the OS account that ran the command
    host: str | None = None
    description: str | None = None
    request_id: str | None = None

    def audit_event(self) -> dict[str, Any]:
        listing = self.action == "list"
        agent: dict[str, Any] = {
            "type": {"coding": [{"system": DCM, "code": "110150", "display": "Application"}]},
            "who": {"identifier": {"system": OPERATOR_SYSTEM, "value": self.operator}},
            "name": f"alliance client {self.action}",
            "requestor": True,
        }
        if self.host:
            agent["network"] = {"address": self.host, "type": "1"}
        event: dict[str, Any] = {
            "resourceType": "AuditEvent",
            "type": EVENT_TYPE if listing else SECURITY_ALERT,
            "subtype": [{"system": INTERACTIONS, "code": "search-type"} if listing else SECURITY_ATTRIBUTES_CHANGED,
                        {"system": CLIENT_MANAGEMENT, "code": self.action}],
            "action": CLIENT_ACTIONS.get(self.action, "E"),
            "recorded": format_instant(self.recorded),
            "outcome": _outcome(self.status),
            "agent": [agent],
            "source": {"observer": {"display": "alliance command"}, "type": [SOURCE_TYPE]},
            "entity": self._entities(),
        }
        if self.status >= 400 and self.description:
            event["outcomeDesc"] = self.description[:200]
        if not event["entity"]:
            del event["entity"]
        return event

    def _entities(self) -> list[dict[str, Any]]:
        entities: list[dict[str, Any]] = []
        if self.client_id:
            entities.append({"what": {"identifier": {"system": CLIENT_SYSTEM, "value": recorded_client_id(self.client_id)}},
                             "type": {"system": OBJECT_TYPE, "code": "2", "display": "System Object"},
                             "role": _SECURITY_USER_ENTITY})
        if self.organization:
            # Named as an entity so that the organization's auditors see what was done to its clients.
            entities.append({"what": {"reference": self.organization},
                             "type": {"system": OBJECT_TYPE, "code": "3", "display": "Organization"},
                             "role": _SECURITY_USER_GROUP})
        return entities


Note = AccessNote | TokenRequestNote | ClientAdminNote

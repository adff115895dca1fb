"""The event envelope: what a service announces, how it is named on the bus and carried by NATS.

An event is either a resource event (a create/update/patch/delete of a stored resource, payload
= the stored JSON bytes, none for a delete) or a business event a service emits itself
(`referral.accepted`, payload = its JSON). The payload is carried as bytes and never re-encoded,
so FHIR decimals keep their written precision from the outbox to the consumer.
"""

import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from fhirkit import jsonio

EventKind = Literal["resource", "business"]
RESOURCE_INTERACTIONS = frozenset({"create", "update", "patch", "delete"})

# Dot-separated tokens a NATS subject accepts (no wildcards, no spaces).
_SUBJECT_TOKENS = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
_FILTER_TOKEN = re.compile(r"^([A-Za-z0-9_-]+|\*|>)$")

NATS_MSG_ID = "Nats-Msg-Id"  # JetStream drops a re-publish with the same id within its window
_HEADER_PREFIX = "Alliance-"


def now_micros() -> int:
    return time.time_ns() // 1000


def new_event_id() -> str:
    return str(uuid.uuid4())


def check_event_type(event_type: str) -> None:
    if not _SUBJECT_TOKENS.match(event_type) or len(event_type) > 128:
        raise ValueError(f"Event type {event_type!r} must be dot-separated letters, digits, '-' or '_'")


def check_subject_filter(subject_filter: str) -> None:
    tokens = subject_filter.split(".")
    if not all(_FILTER_TOKEN.match(token) for token in tokens) or ">" in tokens[:-1]:
        raise ValueError(f"Subject filter {subject_filter!r}: tokens of letters, digits, '-', '_', '*', or a final '>'")


def check_subject_token(name: str, value: str) -> None:
    if not _TOKEN.match(value):
        raise ValueError(f"{name} {value!r} cannot be a subject token (letters, digits, '-', '_')")


@dataclass(frozen=True)
class Event:
    id: str  # uuid; consumers deduplicate on it
    seq: int  # the outbox sequence number in the emitting service's database
    service: str
    kind: EventKind
    type: str  # create | update | patch | delete, or the business event type
    occurred_at: int  # microseconds since the epoch (UTC)
    resource_type: str | None = None
    resource_id: str | None = None
    version_id: int | None = None
    owner: str | None = None  # the owning organization, when known (`Organization/…`)
    request_id: str | None = None
    payload: bytes | None = None

    @property
    def subject(self) -> str:
        """The subject below the bus prefix: `<service>.<ResourceType>.<interaction>` or
        `<service>.business.<event_type>`."""
        if self.kind == "resource":
            return f"{self.service}.{self.resource_type}.{self.type}"
        return f"{self.service}.business.{self.type}"

    @property
    def reference(self) -> str | None:
        if self.resource_type and self.resource_id:
            return f"{self.resource_type}/{self.resource_id}"
        return None

    def json(self) -> Any:
        """The payload parsed (FHIR decimals kept as written); None for a delete."""
        return jsonio.loads(self.payload) if self.payload is not None else None


# --- the outbox row ↔ Event ------------------------------------------------------------------


def event_from_row(row: Any) -> Event:
    values = row._mapping
    return Event(
        id=values["event_id"],
        seq=values["seq"],
        service=values["service"],
        kind=values["kind"],
        type=values["event_type"],
        occurred_at=values["occurred_at"],
        resource_type=values["resource_type"],
        resource_id=values["resource_id"],
        version_id=values["version_id"],
        owner=values["owner"],
        request_id=values["request_id"],
        payload=values["payload"],
    )


def row_values(event: Event) -> dict[str, Any]:
    """The envelope columns shared by the outbox and the dead-letter table."""
    return {
        "event_id": event.id,
        "service": event.service,
        "kind": event.kind,
        "event_type": event.type,
        "resource_type": event.resource_type,
        "resource_id": event.resource_id,
        "version_id": event.version_id,
        "owner": event.owner,
        "occurred_at": event.occurred_at,
        "request_id": event.request_id,
        "payload": event.payload,
    }


# --- the NATS message ↔ Event -------------------------------------------------------------
# Metadata travels in headers and the body is the payload itself, byte for byte.

_OPTIONAL_HEADERS = {
    "resource_type": "Resource-Type",
    "resource_id": "Resource-Id",
    "version_id": "Version-Id",
    "owner": "Owner",
    "request_id": "Request-Id",
}


def message_headers(event: Event) -> dict[str, str]:
    headers = {
        NATS_MSG_ID: event.id,
        _HEADER_PREFIX + "Seq": str(event.seq),
        _HEADER_PREFIX + "Service": event.service,
        _HEADER_PREFIX + "Kind": event.kind,
        _HEADER_PREFIX + "Type": event.type,
        _HEADER_PREFIX + "Occurred-At": str(event.occurred_at),
        "Content-Type": "application/fhir+json" if event.kind == "resource" else "application/json",
    }
    for field, name in _OPTIONAL_HEADERS.items():
        value = getattr(event, field)
        if value is not None and _header_safe(str(value)):
            headers[_HEADER_PREFIX + name] = str(value)
    if event.payload is None:
        headers[_HEADER_PREFIX + "No-Payload"] = "1"  # a delete, told apart from an empty body
    return headers


def event_from_message(headers: dict[str, str] | None, data: bytes) -> Event:
    """Raises KeyError/ValueError for a message that is not one of ours."""
    found = headers or {}

    def optional(name: str) -> str | None:
        return found.get(_HEADER_PREFIX + name)

    version = optional("Version-Id")
    kind = found[_HEADER_PREFIX + "Kind"]
    if kind not in ("resource", "business"):
        raise ValueError(f"Unknown event kind {kind!r}")
    return Event(
        id=found[NATS_MSG_ID],
        seq=int(found[_HEADER_PREFIX + "Seq"]),
        service=found[_HEADER_PREFIX + "Service"],
        kind=kind,  # type: ignore[arg-type]
        type=found[_HEADER_PREFIX + "Type"],
        occurred_at=int(found[_HEADER_PREFIX + "Occurred-At"]),
        resource_type=optional("Resource-Type"),
        resource_id=optional("Resource-Id"),
        version_id=int(version) if version is not None else None,
        owner=optional("Owner"),
        request_id=optional("Request-Id"),
        payload=None if optional("No-Payload") else data,
    )


def _header_safe(value: str) -> bool:
    # A request id comes from a client header: keep it only if it cannot break the header block.
    return value.isascii() and value.isprintable()


def subject_matches(subject_filter: str, subject: str) -> bool:
    """NATS wildcard semantics: `*` is one token, a final `>` one or more tokens."""
    wanted = subject_filter.split(".")
    tokens = subject.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return index == len(wanted) - 1 and len(tokens) > index
        if index >= len(tokens) or (token != "*" and token != tokens[index]):
            return False
    return len(tokens) == len(wanted)

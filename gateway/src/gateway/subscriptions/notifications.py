"""Notification bundles in the R4B backport format, and their signature.

A notification is a `history` Bundle whose first entry is an R4B `SubscriptionStatus` (with a
request matching `Subscription/{id}/$status`, as bdl-3/bdl-4 require), followed by one entry per
event unless the content is `empty`: `id-only` gives fullUrl and request, `full-resource` the
resource too. `$status` answers a `searchset` Bundle of one SubscriptionStatus.
"""

import hashlib
import hmac
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fhirkit import jsonio

NOTIFICATION_PROFILE = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-notification"
SIGNATURE_HEADER = "X-Alliance-Signature"


@dataclass(frozen=True)
class NotificationEvent:
    number: int
    interaction: str
    resource_type: str
    resource_id: str
    occurred_at: int
    payload: bytes | None  # what the subscriber may read; None unless the content is full-resource


@dataclass(frozen=True)
class StatusView:
    subscription_id: str
    topic_url: str
    status: str
    events_since_start: int
    error: str | None = None


def instant(micros: int) -> str:
    return datetime.fromtimestamp(micros / 1_000_000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def subscription_status(
    view: StatusView, kind: str, base: str, events: list[NotificationEvent], content: str
) -> dict[str, Any]:
    status: dict[str, Any] = {
        "resourceType": "SubscriptionStatus",
        "status": view.status,
        "type": kind,
        "eventsSinceSubscriptionStart": str(view.events_since_start),
        "subscription": {"reference": f"{base}/Subscription/{view.subscription_id}"},
        "topic": view.topic_url,
    }
    if events:
        status["notificationEvent"] = [_notification_event(event, base, content) for event in events]
    if view.error:
        status["error"] = [{"text": view.error[:1000]}]
    return status


def _notification_event(event: NotificationEvent, base: str, content: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"eventNumber": str(event.number), "timestamp": instant(event.occurred_at)}
    if content != "empty":
        entry["focus"] = {"reference": f"{base}/{event.resource_type}/{event.resource_id}"}
    return entry


def notification_bundle(
    view: StatusView, kind: str, base: str, events: list[NotificationEvent], content: str
) -> dict[str, Any]:
    """kind: handshake | heartbeat | event-notification | query-event."""
    status = subscription_status(view, kind, base, events, content)
    entries: list[dict[str, Any]] = [{
        "fullUrl": f"urn:uuid:{uuid.uuid4()}",
        "resource": status,
        "request": {"method": "GET", "url": f"{base}/Subscription/{view.subscription_id}/$status"},
        "response": {"status": "200"},
    }]
    if content != "empty":
        entries.extend(_resource_entry(event, base, content) for event in events)
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"profile": [NOTIFICATION_PROFILE]},
        "type": "history",
        "timestamp": instant(time.time_ns() // 1000),
        "entry": entries,
    }


def _resource_entry(event: NotificationEvent, base: str, content: str) -> dict[str, Any]:
    created = event.interaction == "create"
    entry: dict[str, Any] = {
        "fullUrl": f"{base}/{event.resource_type}/{event.resource_id}",
        "request": {
            "method": "POST" if created else "PUT",
            "url": event.resource_type if created else f"{event.resource_type}/{event.resource_id}",
        },
        "response": {"status": "201" if created else "200"},
    }
    if content == "full-resource" and event.payload is not None:
        entry["resource"] = jsonio.loads(event.payload)
    return entry


def status_bundle(view: StatusView, base: str) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": 1,
        "entry": [{
            "fullUrl": f"urn:uuid:{uuid.uuid4()}",
            "resource": subscription_status(view, "query-status", base, [], "empty"),
            "search": {"mode": "match"},
        }],
    }


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """`t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>`: the time is signed too, so a
    receiver can refuse an old notification replayed by someone who recorded it."""
    moment = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode("utf-8"), f"{moment}.".encode("ascii") + body, hashlib.sha256).hexdigest()
    return f"t={moment},v1={digest}"


def verify(secret: str, body: bytes, header: str, *, tolerance_seconds: int = 300, now: int | None = None) -> bool:
    """What a receiver does with the header (also in docs/examples/receiver.py)."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    if not fields.get("t", "").isdigit() or "v1" not in fields:
        return False
    moment = int(fields["t"])
    if abs((int(time.time()) if now is None else now) - moment) > tolerance_seconds:
        return False
    return hmac.compare_digest(sign(secret, body, moment), f"t={moment},v1={fields['v1']}")

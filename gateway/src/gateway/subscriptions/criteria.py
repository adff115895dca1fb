"""Reading an R4B Subscription written per the Subscriptions R5 Backport IG.

`criteria` is the topic's canonical URL; filters are `backport-filter-criteria` extensions on
`criteria` (`_criteria` in JSON), each `Type?name=value[&name=value]` or `name=value`; the channel
carries `backport-heartbeat-period`, `backport-timeout`, `backport-max-count`, and the payload's
`backport-payload-content` (on `_payload`). Every problem is a 422 naming the element.
"""

import re
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import parse_qsl

import orjson

from fhirkit.errors import BusinessRuleViolation
from gateway.subscriptions.topics import BY_URL, Topic, TopicFilter, relative_reference

BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
FILTER_CRITERIA = f"{BACKPORT}/backport-filter-criteria"
PAYLOAD_CONTENT = f"{BACKPORT}/backport-payload-content"
HEARTBEAT_PERIOD = f"{BACKPORT}/backport-heartbeat-period"
TIMEOUT = f"{BACKPORT}/backport-timeout"
MAX_COUNT = f"{BACKPORT}/backport-max-count"
# Ours: the shared secret for the signature header. Write-only: the gateway keeps it in its own
# table and removes it from the stored Subscription, so reading the Subscription never shows it.
SIGNING_SECRET = "http://county-alliance.org/fhir/StructureDefinition/subscription-signing-secret"

CONTENTS = ("empty", "id-only", "full-resource")
PAYLOAD_TYPES = ("application/fhir+json", "application/json")
MIN_SECRET_LENGTH = 32
MAX_MAX_COUNT = 100
DEFAULT_MAX_COUNT = 20
MAX_HEADERS = 10
# Headers the gateway sets itself; a channel header may not replace them.
RESERVED_HEADERS = frozenset({"content-type", "content-length", "host", "transfer-encoding", "connection",
                              "x-alliance-signature"})
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")


@dataclass(frozen=True)
class SubscriptionConfig:
    topic_url: str
    filters: dict[str, list[str]]  # filter name → accepted values (OR); names are ANDed
    endpoint: str
    content: str
    payload_type: str
    heartbeat_seconds: int | None
    timeout_seconds: float
    max_count: int
    headers: list[tuple[str, str]]

    @property
    def topic(self) -> Topic:
        return BY_URL[self.topic_url]

    def accepts(self, resource: dict[str, Any]) -> bool:
        """All filters hold for `resource` (a type with no element for a filter never does)."""
        for name, wanted in self.filters.items():
            topic_filter = self.topic.filter(name)
            assert topic_filter is not None  # checked when the Subscription was written
            found = topic_filter.values_in(resource)
            if found is None or not set(found) & set(wanted):
                return False
        return True

    def to_json(self) -> str:
        return orjson.dumps(asdict(self)).decode()

    @classmethod
    def from_json(cls, text: str) -> "SubscriptionConfig":
        values = orjson.loads(text)
        values["headers"] = [tuple(pair) for pair in values["headers"]]
        return cls(**values)


QUERY_CRITERIA = re.compile(r"^[A-Z][A-Za-z]{1,63}(\?.*)?$")


def is_query_criteria(subscription: dict[str, Any]) -> bool:
    """An R4 query-based subscription (`Observation?code=…`): stored as a record, never delivered."""
    criteria = subscription.get("criteria")
    return isinstance(criteria, str) and QUERY_CRITERIA.match(criteria) is not None


def read_config(subscription: dict[str, Any], *, default_timeout: float, heartbeat_min: int) -> SubscriptionConfig:
    topic = _topic(subscription)
    channel = subscription.get("channel") or {}
    if channel.get("type") != "rest-hook":
        raise _invalid("Only the rest-hook channel is offered", "Subscription.channel.type")
    endpoint = channel.get("endpoint")
    if not isinstance(endpoint, str) or not endpoint:
        raise _invalid("A rest-hook subscription needs channel.endpoint", "Subscription.channel.endpoint")
    return SubscriptionConfig(
        topic_url=topic.url,
        filters=_filters(subscription, topic),
        endpoint=endpoint,
        content=_content(channel),
        payload_type=_payload_type(channel),
        heartbeat_seconds=_heartbeat(channel, heartbeat_min),
        timeout_seconds=_timeout(channel, default_timeout),
        max_count=_max_count(channel),
        headers=_headers(channel),
    )


def take_signing_secret(subscription: dict[str, Any]) -> str | None:
    """Remove the signing-secret extension from the channel; its value (checked), if any."""
    channel = subscription.get("channel") or {}
    extensions = channel.get("extension") or []
    kept = [e for e in extensions if not (isinstance(e, dict) and e.get("url") == SIGNING_SECRET)]
    given = [e.get("valueString") for e in extensions if isinstance(e, dict) and e.get("url") == SIGNING_SECRET]
    if kept:
        channel["extension"] = kept
    else:
        channel.pop("extension", None)
    if not given:
        return None
    secret = given[-1]
    if not isinstance(secret, str) or len(secret) < MIN_SECRET_LENGTH:
        raise _invalid(f"The signing secret must be a string of at least {MIN_SECRET_LENGTH} characters",
                       "Subscription.channel.extension('subscription-signing-secret')")
    return secret


def _topic(subscription: dict[str, Any]) -> Topic:
    criteria = subscription.get("criteria")
    topic = BY_URL.get(criteria) if isinstance(criteria, str) else None
    if topic is None:
        known = ", ".join(sorted(BY_URL))
        raise _invalid(f"Subscription.criteria must be the canonical URL of a topic this server offers: {known}",
                       "Subscription.criteria")
    return topic


def _filters(subscription: dict[str, Any], topic: Topic) -> dict[str, list[str]]:
    filters: dict[str, list[str]] = {}
    for extension in (subscription.get("_criteria") or {}).get("extension") or []:
        if not isinstance(extension, dict) or extension.get("url") != FILTER_CRITERIA:
            continue
        value = extension.get("valueString")
        if not isinstance(value, str) or not value.strip():
            raise _invalid("A filter criteria extension needs a valueString", "Subscription.criteria.extension")
        for name, values in _parse_filter(value, topic):
            filters.setdefault(name, []).extend(v for v in values if v not in filters.get(name, []))
    return filters


def _parse_filter(text: str, topic: Topic) -> list[tuple[str, list[str]]]:
    resource_type, _, query = text.strip().rpartition("?")
    if resource_type and resource_type not in topic.resource_types:
        raise _invalid(f"Topic {topic.code} is about {', '.join(sorted(topic.resource_types))}, not {resource_type}",
                       "Subscription.criteria.extension")
    pairs = parse_qsl(query, keep_blank_values=True)
    if not pairs:
        raise _invalid(f"Filter '{text[:100]}' is not name=value", "Subscription.criteria.extension")
    parsed = []
    for name, raw in pairs:
        topic_filter = topic.filter(name)
        if topic_filter is None or (resource_type and resource_type not in topic_filter.elements):
            allowed = ", ".join(f.name for f in topic.filters)
            raise _invalid(f"Topic {topic.code} cannot filter by '{name[:64]}' here (it allows: {allowed})",
                           "Subscription.criteria.extension")
        values = [_filter_value(topic_filter, v) for v in raw.split(",")]
        if not all(values):
            raise _invalid(f"Filter '{name}' has an empty value", "Subscription.criteria.extension")
        parsed.append((name, values))
    return parsed


def _filter_value(topic_filter: TopicFilter, value: str) -> str:
    value = value.strip()
    return relative_reference(value) if topic_filter.kind == "reference" and value else value


def _content(channel: dict[str, Any]) -> str:
    found = _extension_value(channel.get("_payload"), PAYLOAD_CONTENT, "valueCode")
    content = found if found is not None else "id-only"
    if content not in CONTENTS:
        raise _invalid(f"Payload content must be one of {', '.join(CONTENTS)}", "Subscription.channel.payload")
    return content


def _payload_type(channel: dict[str, Any]) -> str:
    payload = channel.get("payload") or "application/fhir+json"
    if payload not in PAYLOAD_TYPES:
        raise _invalid("Notifications are sent as application/fhir+json", "Subscription.channel.payload")
    return payload


def _heartbeat(channel: dict[str, Any], minimum: int) -> int | None:
    period = _extension_value(channel, HEARTBEAT_PERIOD, "valueUnsignedInt")
    if period is None:
        return None
    if not isinstance(period, int) or period < minimum:
        raise _invalid(f"The heartbeat period is at least {minimum} seconds", "Subscription.channel.extension")
    return period


def _timeout(channel: dict[str, Any], default: float) -> float:
    value = _extension_value(channel, TIMEOUT, "valueUnsignedInt")
    if value is None:
        return default
    if not isinstance(value, int) or not 1 <= value <= 60:
        raise _invalid("The timeout is 1 to 60 seconds", "Subscription.channel.extension")
    return float(value)


def _max_count(channel: dict[str, Any]) -> int:
    value = _extension_value(channel, MAX_COUNT, "valuePositiveInt")
    if value is None:
        return DEFAULT_MAX_COUNT
    if not isinstance(value, int) or not 1 <= value <= MAX_MAX_COUNT:
        raise _invalid(f"The maximum count is 1 to {MAX_MAX_COUNT}", "Subscription.channel.extension")
    return value


def _headers(channel: dict[str, Any]) -> list[tuple[str, str]]:
    headers = []
    for index, text in enumerate(channel.get("header") or []):
        name, colon, value = str(text).partition(":")
        value = value.strip()
        where = f"Subscription.channel.header[{index}]"
        if not colon or not _HEADER_NAME.match(name.strip()) or not value.isprintable() or not value.isascii():
            raise _invalid("A channel header is 'Name: value' in printable ASCII", where)
        if name.strip().lower() in RESERVED_HEADERS:
            raise _invalid(f"The gateway sets {name.strip()} itself", where)
        headers.append((name.strip(), value))
    if len(headers) > MAX_HEADERS:
        raise _invalid(f"At most {MAX_HEADERS} channel headers", "Subscription.channel.header")
    return headers


def _extension_value(element: Any, url: str, key: str) -> Any:
    for extension in (element or {}).get("extension") or [] if isinstance(element, dict) else []:
        if isinstance(extension, dict) and extension.get("url") == url:
            return extension.get(key)
    return None


def _invalid(message: str, expression: str) -> BusinessRuleViolation:
    return BusinessRuleViolation(message, expression=[expression])

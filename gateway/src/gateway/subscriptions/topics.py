"""The alliance's SubscriptionTopics (DOMAIN.md §5) and which service events they match.

A topic is matched on the event envelope (emitting service, resource type, interaction) and on
the written resource, which resource events carry as their payload. Filters name an element of
the resource per resource type; an event whose resource type has no element for a filter the
subscriber set does not match (never deliver more than asked for).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from servicekit.events import Event

BASE = "http://county-alliance.org/fhir"
TOPIC_BASE = f"{BASE}/SubscriptionTopic"
TASK_CODE = f"{BASE}/CodeSystem/task-code"
GREEN_CHANNEL = f"{BASE}/StructureDefinition/green-channel"
TELEMEDICINE_TASK_CODES = frozenset(
    {"teleconsultation", "remote-diagnosis", "remote-imaging", "remote-ecg", "remote-pathology"}
)
FINAL_RESULT_STATUSES = frozenset({"final", "amended", "corrected"})
WRITES = frozenset({"create", "update", "patch"})
CHANGES = frozenset({"update", "patch"})

FilterKind = Literal["reference", "token"]


@dataclass(frozen=True)
class TopicFilter:
    name: str
    kind: FilterKind
    description: str
    elements: dict[str, str]  # resource type → top-level element holding the value

    def values_in(self, resource: dict[str, Any]) -> list[str] | None:
        """The resource's values for this filter; None when its type has no such element."""
        element = self.elements.get(resource.get("resourceType", ""))
        if element is None:
            return None
        raw = resource.get(element)
        items = raw if isinstance(raw, list) else [raw] if raw is not None else []
        return [value for item in items for value in _values(item, self.kind)]


@dataclass(frozen=True)
class Trigger:
    service: str
    resource_type: str
    interactions: frozenset[str]
    description: str
    fhirpath: str  # the same predicate as `applies`, for the published SubscriptionTopic
    applies: Callable[[dict[str, Any]], bool]


@dataclass(frozen=True)
class Topic:
    code: str
    title: str
    description: str
    triggers: tuple[Trigger, ...]
    filters: tuple[TopicFilter, ...]

    @property
    def url(self) -> str:
        return f"{TOPIC_BASE}/{self.code}"

    @property
    def resource_types(self) -> frozenset[str]:
        return frozenset(trigger.resource_type for trigger in self.triggers)

    def filter(self, name: str) -> TopicFilter | None:
        return next((f for f in self.filters if f.name == name), None)

    def concerns(self, event: Event) -> bool:
        """Whether a trigger listens to this kind of event, before its resource is looked at."""
        return any(_listens(trigger, event) for trigger in self.triggers)

    def matches(self, event: Event, resource: dict[str, Any]) -> bool:
        return any(_listens(trigger, event) and trigger.applies(resource) for trigger in self.triggers)


def _listens(trigger: Trigger, event: Event) -> bool:
    return (trigger.service == event.service and trigger.resource_type == event.resource_type
            and event.type in trigger.interactions)


def _values(item: Any, kind: FilterKind) -> list[str]:
    if kind == "reference":
        if isinstance(item, dict) and isinstance(item.get("actor"), dict):
            item = item["actor"]  # an Appointment participant: its actor is the party
        reference = item.get("reference") if isinstance(item, dict) else None
        return [relative_reference(reference)] if isinstance(reference, str) else []
    if isinstance(item, str):  # a code element (status, priority)
        return [item]
    if isinstance(item, dict):  # a CodeableConcept: match `code` or `system|code`
        codings = [c for c in item.get("coding") or [] if isinstance(c, dict) and c.get("code")]
        return [v for c in codings for v in (c["code"], f"{c.get('system', '')}|{c['code']}")]
    return []


def relative_reference(reference: str) -> str:
    """`Type/id` of a relative or absolute literal reference (history suffix dropped)."""
    parts = reference.split("/_history/")[0].rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) >= 2 else reference


def _task_code(resource: dict[str, Any]) -> set[str]:
    codings = (resource.get("code") or {}).get("coding") or []
    return {c.get("code") for c in codings if isinstance(c, dict) and c.get("system") == TASK_CODE}


def _is_referral_task(resource: dict[str, Any]) -> bool:
    return "referral" in _task_code(resource)


def _is_teleconsult_task(resource: dict[str, Any]) -> bool:
    return bool(_task_code(resource) & TELEMEDICINE_TASK_CODES)


def _is_green_channel(resource: dict[str, Any]) -> bool:
    return any(isinstance(e, dict) and e.get("url") == GREEN_CHANNEL for e in resource.get("extension") or [])


def _is_final_result(resource: dict[str, Any]) -> bool:
    return resource.get("status") in FINAL_RESULT_STATUSES


def _is_recall_task(resource: dict[str, Any]) -> bool:
    return "recall" in _task_code(resource)


def _is_scheduled_request(resource: dict[str, Any]) -> bool:
    return bool(resource.get("basedOn"))


def _always(resource: dict[str, Any]) -> bool:
    return True


def _reference(name: str, description: str, **elements: str) -> TopicFilter:
    return TopicFilter(name, "reference", description, dict(elements))


def _token(name: str, description: str, **elements: str) -> TopicFilter:
    return TopicFilter(name, "token", description, dict(elements))


# On an Appointment every participant is a party: a consultation's two organizations and its patient.
_TASK_FILTERS = (
    _reference("owner", "The organization the Task is addressed to (Task.owner; an Appointment's participants)",
               Task="owner", Appointment="participant"),
    _reference("requester", "The requesting organization or practitioner role (Task.requester; an Appointment's "
               "participants)", Task="requester", Appointment="participant"),
    _reference("patient", "The patient (Task.for; an Appointment's participants)", Task="for",
               Appointment="participant"),
)
_TASK_STATUS = _token("status", "The Task's status, e.g. accepted (an Appointment's: booked, cancelled)",
                      Task="status", Appointment="status")
_TASK_CODE_FILTER = _token("code", "The Task's code, e.g. teleconsultation or remote-diagnosis", Task="code")
_REFERRAL_TASK = "Task.code.coding.where(system='" + TASK_CODE + "' and code='referral').exists()"
_TELECONSULT_TASK = (
    "Task.code.coding.where(system='" + TASK_CODE + "' and code in ('" + "' | '".join(sorted(TELEMEDICINE_TASK_CODES))
    + "')).exists()"
)
_FINAL = "status in ('final' | 'amended' | 'corrected')"

TOPICS: tuple[Topic, ...] = (
    Topic(
        "referral-request",
        "New referral (转诊申请)",
        "A referral Task was created: a receiving hospital learns of a request addressed to it.",
        (Trigger("referral", "Task", frozenset({"create"}), "A referral Task is created", _REFERRAL_TASK,
                 _is_referral_task),),
        (*_TASK_FILTERS, _token("priority", "The referral's priority (routine, urgent, asap, stat)", Task="priority")),
    ),
    Topic(
        "referral-status",
        "Referral changed (转诊状态变化)",
        "A referral Task changed after its creation: accepted, rejected, on hold, completed, reassigned…",
        (Trigger("referral", "Task", CHANGES, "A referral Task is updated", _REFERRAL_TASK, _is_referral_task),),
        (*_TASK_FILTERS, _TASK_STATUS),
    ),
    Topic(
        "green-channel-alert",
        "Green-channel alert (绿色通道预警)",
        "A green-channel referral (chest pain, stroke, trauma, critical maternal or neonatal) was sent.",
        (Trigger("referral", "ServiceRequest", frozenset({"create"}), "A green-channel ServiceRequest is created",
                 "ServiceRequest.extension('" + GREEN_CHANNEL + "').exists()", _is_green_channel),),
        (
            _reference("performer", "The receiving emergency center (ServiceRequest.performer)",
                       ServiceRequest="performer"),
            _reference("requester", "The sending organization (ServiceRequest.requester)", ServiceRequest="requester"),
            _reference("patient", "The patient (ServiceRequest.subject)", ServiceRequest="subject"),
        ),
    ),
    Topic(
        "teleconsult-request",
        "New teleconsultation or remote diagnosis request (远程会诊/诊断申请)",
        "A telemedicine Task (teleconsultation or remote diagnosis) was created.",
        (Trigger("telemedicine", "Task", frozenset({"create"}), "A telemedicine Task is created", _TELECONSULT_TASK,
                 _is_teleconsult_task),),
        (*_TASK_FILTERS, _TASK_CODE_FILTER),
    ),
    Topic(
        "teleconsult-status",
        "Teleconsultation changed (远程会诊状态变化)",
        "A telemedicine Task changed after its creation (accepted, reported, cancelled…), or the session of a "
        "telemedicine request was booked, moved or cancelled (its Appointment).",
        (Trigger("telemedicine", "Task", CHANGES, "A telemedicine Task is updated", _TELECONSULT_TASK,
                 _is_teleconsult_task),
         Trigger("telemedicine", "Appointment", WRITES, "The session of a telemedicine request is booked, moved or "
                 "cancelled", "Appointment.basedOn.exists()", _is_scheduled_request)),
        (*_TASK_FILTERS, _TASK_CODE_FILTER, _TASK_STATUS),
    ),
    Topic(
        "result-available",
        "Result available (检查检验结果可用)",
        "A DiagnosticReport or Observation was written with a final, amended or corrected status.",
        (
            Trigger("results-sharing", "DiagnosticReport", WRITES, "A final DiagnosticReport is written",
                    "DiagnosticReport." + _FINAL, _is_final_result),
            Trigger("results-sharing", "Observation", WRITES, "A final Observation is written",
                    "Observation." + _FINAL, _is_final_result),
        ),
        (
            _reference("patient", "The patient (subject)", DiagnosticReport="subject", Observation="subject"),
            _token("category", "The result's category, e.g. LAB, RAD", DiagnosticReport="category",
                   Observation="category"),
            _token("code", "The result's code (LOINC or the recognition catalog)", DiagnosticReport="code",
                   Observation="code"),
            _reference("performer", "The producing center (performer)", DiagnosticReport="performer",
                       Observation="performer"),
        ),
    ),
    Topic(
        "recall",
        "Sterile supply recall (无菌物品召回)",
        "A recall was opened (DetectedIssue) or a recall Task was addressed to an institution.",
        (
            Trigger("results-sharing", "DetectedIssue", frozenset({"create"}), "A DetectedIssue is created",
                    "DetectedIssue.exists()", _always),
            Trigger("results-sharing", "Task", frozenset({"create"}), "A recall Task is created",
                    "Task.code.coding.where(system='" + TASK_CODE + "' and code='recall').exists()",
                    _is_recall_task),
        ),
        (
            _reference("owner", "The institution that must act (Task.owner); DetectedIssues have none",
                       Task="owner"),
            _reference("patient", "An exposed patient (DetectedIssue.patient, Task.for)", DetectedIssue="patient",
                       Task="for"),
        ),
    ),
)

BY_URL: dict[str, Topic] = {topic.url: topic for topic in TOPICS}
BY_CODE: dict[str, Topic] = {topic.code: topic for topic in TOPICS}


def event_sources() -> list[tuple[str, str]]:
    """(service, resource type) pairs the topics listen to: one bus consumer each."""
    return sorted({(t.service, t.resource_type) for topic in TOPICS for t in topic.triggers})


def matching_topics(event: Event, resource: dict[str, Any]) -> list[Topic]:
    return [topic for topic in TOPICS if topic.matches(event, resource)]


def concerned_topics(event: Event) -> list[Topic]:
    return [topic for topic in TOPICS if topic.concerns(event)]


def topic_resource(topic: Topic) -> dict[str, Any]:
    """The R4B SubscriptionTopic the gateway serves for `topic`."""
    return {
        "resourceType": "SubscriptionTopic",
        "id": topic.code,
        "url": topic.url,
        "version": "1.0.0",
        "title": topic.title,
        "status": "active",
        "description": topic.description,
        "resourceTrigger": [
            {
                "description": trigger.description,
                "resource": trigger.resource_type,
                "supportedInteraction": sorted({"patch": "update"}.get(i, i) for i in trigger.interactions),
                "fhirPathCriteria": trigger.fhirpath,
            }
            for trigger in topic.triggers
        ],
        "canFilterBy": [
            {
                "description": topic_filter.description,
                "resource": resource_type,
                "filterParameter": topic_filter.name,
            }
            for topic_filter in topic.filters
            for resource_type in sorted(topic_filter.elements)
        ],
        "notificationShape": [
            {"resource": resource_type} for resource_type in sorted(topic.resource_types)
        ],
    }

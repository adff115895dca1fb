"""Which service answers a FHIR request, and which SMART interaction it is. Pure functions.

Most types have one owner. ServiceRequest, Task and Provenance have several (ARCHITECTURE.md
§1): a create goes by the resource's `category` / `code` / first `target`, a read or update by
the id (ids minted by an owner carry its prefix; other ids are asked of each owner in turn), and
a search by its `category` / `code` / `target` parameter, else to the default owner (referral).
"""

from dataclasses import dataclass
from typing import Any

from fhirkit.errors import UnknownResourceType
from fhirkit.resources import is_resource_type
from servicekit import topology

BASE = "http://county-alliance.org/fhir"
TELEMEDICINE_CATEGORY = f"{BASE}/CodeSystem/telemedicine-category"
TASK_CODE = f"{BASE}/CodeSystem/task-code"
TELEMEDICINE_CODES = {"teleconsultation", "remote-imaging", "remote-ecg", "remote-pathology", "remote-diagnosis"}
RESULTS_TASK_CODES = {"recognition-decision", "recall"}


@dataclass(frozen=True)
class Route:
    services: tuple[str, ...]  # candidates in order; the first that knows the resource answers
    resource_type: str | None
    interaction: str  # SMART letter: c r u d s, or "" for none needed (metadata)


def owners_of(resource_type: str) -> list[str]:
    found = topology.owners(resource_type)
    if not found:
        if is_resource_type(resource_type):
            raise UnknownResourceType(f"Resource type '{resource_type}' is not held by this alliance server")
        raise UnknownResourceType(f"'{resource_type[:64]}' is not a FHIR resource type")
    return found


def service_for_resource(resource: dict[str, Any]) -> str:
    """The owner of a resource about to be written, from its content."""
    resource_type = resource.get("resourceType")
    if not isinstance(resource_type, str):
        raise UnknownResourceType("The resource has no resourceType")
    candidates = owners_of(resource_type)
    if len(candidates) == 1:
        return candidates[0]
    if resource_type == "ServiceRequest":
        return "telemedicine" if _has_coding(resource.get("category"), TELEMEDICINE_CATEGORY) else "referral"
    if resource_type == "Task":
        codes = _codes(resource.get("code"), TASK_CODE)
        if codes & TELEMEDICINE_CODES:
            return "telemedicine"
        if codes & RESULTS_TASK_CODES:
            return "results-sharing"
        return "referral"
    if resource_type == "Provenance":
        targets = resource.get("target")
        first = targets[0] if isinstance(targets, list) and targets else None
        reference = first.get("reference") if isinstance(first, dict) else None
        return provenance_owner(reference)
    return candidates[0]


def provenance_owner(reference: Any) -> str:
    if not isinstance(reference, str) or "/" not in reference:
        return "referral"
    parts = [p for p in reference.split("/") if p]
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) < 2:
        return "referral"
    target_type, target_id = parts[-2], parts[-1]
    by_prefix = topology.owner_by_id(target_type, target_id)
    if by_prefix:
        return by_prefix
    owners = [o for o in topology.owners(target_type) if "Provenance" in topology.OWNED_TYPES[o]]
    return owners[0] if owners else "referral"


def services_for_id(resource_type: str, resource_id: str) -> tuple[str, ...]:
    by_prefix = topology.owner_by_id(resource_type, resource_id)
    return (by_prefix,) if by_prefix else tuple(owners_of(resource_type))


def services_for_search(resource_type: str, params: list[tuple[str, str]]) -> tuple[str, ...]:
    candidates = owners_of(resource_type)
    if len(candidates) == 1:
        return (candidates[0],)
    values = {k.split(":")[0]: v for k, v in params}
    if resource_type == "ServiceRequest" and "category" in values:
        category = values["category"]
        telemedicine = TELEMEDICINE_CATEGORY in category or category.split("|")[-1] in TELEMEDICINE_CODES
        return ("telemedicine",) if telemedicine else ("referral",)
    if resource_type == "Task" and "code" in values:
        code = values["code"].split("|")[-1]
        if code in TELEMEDICINE_CODES:
            return ("telemedicine",)
        if code in RESULTS_TASK_CODES:
            return ("results-sharing",)
        return ("referral",)
    if resource_type == "Provenance" and "target" in values:
        return (provenance_owner(values["target"]),)
    return tuple(candidates)  # nothing names the owner: ask them all and merge


def _has_coding(concepts: Any, system: str) -> bool:
    return bool(_codes(concepts, system))


def _codes(concepts: Any, system: str) -> set[str]:
    if isinstance(concepts, dict):
        concepts = [concepts]
    found: set[str] = set()
    for concept in concepts or []:
        for coding in (concept or {}).get("coding") or [] if isinstance(concept, dict) else []:
            if isinstance(coding, dict) and coding.get("system") == system and isinstance(coding.get("code"), str):
                found.add(coding["code"])
    return found

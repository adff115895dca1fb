"""The codes telemedicine requests and Tasks are written in (DOMAIN.md §4)."""

from typing import Any

BASE = "http://county-alliance.org/fhir"
CATEGORY_SYSTEM = f"{BASE}/CodeSystem/telemedicine-category"
TASK_CODE_SYSTEM = f"{BASE}/CodeSystem/task-code"
BUSINESS_STATUS_SYSTEM = f"{BASE}/CodeSystem/telemedicine-business-status"
TITLE_SYSTEM = f"{BASE}/CodeSystem/professional-title"
SPECIALTY_SYSTEM = f"{BASE}/CodeSystem/specialty"
VIRTUAL_SERVICE = "http://hl7.org/fhir/5.0/StructureDefinition/extension-Appointment.virtualService"

TELECONSULTATION = "teleconsultation"
REMOTE_DIAGNOSIS = "remote-diagnosis"
# ServiceRequest.category → the Task.code that tracks it.
TASK_CODE_OF_CATEGORY = {
    "teleconsultation": TELECONSULTATION,
    "remote-imaging": REMOTE_DIAGNOSIS,
    "remote-ecg": REMOTE_DIAGNOSIS,
    "remote-pathology": REMOTE_DIAGNOSIS,
}
TASK_CODES = frozenset(TASK_CODE_OF_CATEGORY.values())

# Professional titles (专业技术职务) by grade, highest 4: 正高 > 副高 > 中级 > 师级 > 士级. The codes are
# the directory's (`…/CodeSystem/professional-title`, on Practitioner.qualification).
TITLE_GRADE = {
    "chief-physician": 4, "associate-chief-physician": 3, "attending-physician": 2, "resident-physician": 1,
    "assistant-physician": 0,
    "chief-technologist": 4, "associate-chief-technologist": 3, "technologist-in-charge": 2, "technologist": 1,
    "technician": 0,
    "chief-nurse": 4, "associate-chief-nurse": 3, "nurse-in-charge": 2, "senior-nurse": 1, "junior-nurse": 0,
    "chief-pharmacist": 4, "associate-chief-pharmacist": 3, "pharmacist-in-charge": 2, "staff-pharmacist": 1,
    "assistant-pharmacist": 0,
}


def codes(concepts: Any, system: str) -> list[str]:
    """The codes of `system` in a CodeableConcept or a list of them."""
    if isinstance(concepts, dict):
        concepts = [concepts]
    return [c["code"] for concept in concepts or [] if isinstance(concept, dict)
            for c in concept.get("coding") or [] if c.get("system") == system and isinstance(c.get("code"), str)]


def category_of(request: dict[str, Any]) -> str | None:
    found = codes(request.get("category"), CATEGORY_SYSTEM)
    return found[0] if found else None


def task_code(task: dict[str, Any]) -> str | None:
    found = [c for c in codes(task.get("code"), TASK_CODE_SYSTEM) if c in TASK_CODES]
    return found[0] if found else None


def is_telemedicine_task(task: dict[str, Any]) -> bool:
    return task_code(task) is not None

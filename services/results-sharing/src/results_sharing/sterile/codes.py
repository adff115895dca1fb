"""The codes, identifier systems and extension of sterile supply traceability (WS 310).

Each CodeSystem here is also served by the API (see `code_systems`), so a client can read what
a code means. Chinese displays are the terms a CSSD (消毒供应中心) uses on its records.
"""

from typing import Any

BASE = "http://county-alliance.org/fhir"
MONITORING = f"{BASE}/CodeSystem/sterilization-monitoring"
RESULT = f"{BASE}/CodeSystem/sterilization-result"
DEVICE_KIND = f"{BASE}/CodeSystem/sterile-device-kind"
PROCEDURE = f"{BASE}/CodeSystem/sterile-supply-procedure"
ISSUE = f"{BASE}/CodeSystem/sterile-supply-issue"
RECALL_ITEM = f"{BASE}/CodeSystem/recall-item"
RULE = f"{BASE}/CodeSystem/sterile-supply-rule"
TASK_CODE = f"{BASE}/CodeSystem/task-code"

BARCODE = f"{BASE}/sid/sterile-pack-barcode"
STERILIZER_NUMBER = f"{BASE}/sid/sterilizer"
LOAD_NUMBER = f"{BASE}/sid/sterilization-load"
STERILIZER_EXTENSION = f"{BASE}/StructureDefinition/sterilizer"
FLAG_DETAIL = "http://hl7.org/fhir/StructureDefinition/flag-detail"

# Device kinds
STERILIZER, PACK, IMPLANT = "sterilizer", "pack", "implant"
TRACED_KINDS = {PACK, IMPLANT}  # what carries a barcode, goes through a load and reaches patients
# Monitoring kinds
PHYSICAL, CHEMICAL, BOWIE_DICK, BIOLOGICAL = "physical", "chemical", "bowie-dick", "biological-indicator"
LOAD_MONITORING = {PHYSICAL, CHEMICAL, BIOLOGICAL}  # always about one cycle; a B-D test may stand alone
PASS, FAIL = "pass", "fail"
CYCLE = "sterilization-cycle"
RECALL = "recall"
FAILURE, EXPOSURE = "sterilization-failure", "exposed-patient"
WITHDRAW, USED, EXPOSED = "withdraw", "used-pack", "exposed-patient"

CONCEPTS: dict[str, tuple[str, str, list[tuple[str, str, str]]]] = {
    MONITORING: ("灭菌效果监测 Sterilization monitoring (WS 310.3)", "sterilization-monitoring", [
        (PHYSICAL, "物理监测", "Physical monitoring of a cycle: temperature, pressure and exposure time."),
        (CHEMICAL, "化学监测", "Chemical indicator (external on every pack, internal in high-risk packs)."),
        (BOWIE_DICK, "B-D试验", "Bowie-Dick air-removal test of a pre-vacuum steam sterilizer, daily, empty chamber."),
        (BIOLOGICAL, "生物监测", "Biological indicator; a failure opens a recall of every pack since the last pass."),
    ]),
    RESULT: ("灭菌监测结果 Sterilization monitoring result", "sterilization-result", [
        (PASS, "合格", "The monitoring met its criterion."),
        (FAIL, "不合格", "The monitoring failed its criterion."),
    ]),
    DEVICE_KIND: ("消毒供应器械类别 Sterile supply device kind", "sterile-device-kind", [
        (STERILIZER, "灭菌器", "A sterilizer; cycles are performed by it."),
        (PACK, "无菌器械包", "One sterile package with a barcode label, sterilized in one load."),
        (IMPLANT, "植入物", "A sterile implant; released only after its load's biological indicator passes."),
    ]),
    PROCEDURE: ("消毒供应操作 Sterile supply procedure", "sterile-supply-procedure", [
        (CYCLE, "灭菌循环（灭菌批次）", "One sterilization cycle of a sterilizer with the packs of its load."),
    ]),
    ISSUE: ("消毒供应问题 Sterile supply issue", "sterile-supply-issue", [
        (FAILURE, "灭菌失败（生物监测不合格）", "A biological indicator failed; the packs since the last pass are recalled."),
        (EXPOSURE, "灭菌失败器械已用于患者，需密切观察", "The patient was treated with a pack under recall."),
    ]),
    RECALL_ITEM: ("召回事项 Recall item", "recall-item", [
        (WITHDRAW, "召回未使用器械包", "An unused pack to withdraw from stock."),
        (USED, "已使用器械包", "A pack already used on a patient."),
        (EXPOSED, "暴露患者", "A patient treated with a recalled pack, to observe closely."),
    ]),
    RULE: ("消毒供应规则 Sterile supply rule", "sterile-supply-rule", [
        ("implant-release", "植入物生物监测合格后放行", "An implant is released only after its load's BI passes."),
        ("load-failed", "监测不合格批次不得放行", "A load with a failed monitoring result is not released."),
        ("recalled", "召回中器械包不得发放或使用", "A pack under recall is neither distributed nor used."),
        ("not-sterilized", "未经灭菌器械包不得发放或使用", "A pack that is in no completed cycle is not released."),
        ("expired", "过期器械包不得发放或使用", "A pack past its expiry date is neither distributed nor used."),
        ("single-use", "器械包只用于一次操作", "An opened pack is used in one procedure only."),
        ("retention", "灭菌监测记录保存不少于3年", "Sterilization and monitoring records are kept at least 3 years."),
    ]),
}


def code_systems() -> list[dict[str, Any]]:
    return [_code_system(url, *definition) for url, definition in CONCEPTS.items()]


def _code_system(url: str, title: str, name: str, concepts: list[tuple[str, str, str]]) -> dict[str, Any]:
    return {
        "resourceType": "CodeSystem",
        "id": name,
        "url": url,
        "version": "1",
        "name": "".join(part.capitalize() for part in name.split("-")),
        "title": title,
        "status": "active",
        "content": "complete",
        "caseSensitive": True,
        "count": len(concepts),
        "concept": [{"code": code, "display": display, "definition": definition}
                    for code, display, definition in concepts],
    }


def display(system: str, code: str) -> str:
    return next(d for c, d, _ in CONCEPTS[system][2] if c == code)


def coding(system: str, code: str) -> dict[str, str]:
    return {"system": system, "code": code, "display": display(system, code)}


def concept(system: str, code: str) -> dict[str, Any]:
    return {"coding": [coding(system, code)]}


def codes_in(value: Any, system: str) -> set[str]:
    """The codes of `system` in a CodeableConcept or a list of them."""
    concepts = value if isinstance(value, list) else [value]
    return {
        c["code"] for item in concepts if isinstance(item, dict)
        for c in item.get("coding") or [] if isinstance(c, dict) and c.get("system") == system
        and isinstance(c.get("code"), str)
    }


def first_code(value: Any, system: str) -> str | None:
    found = codes_in(value, system)
    return min(found) if found else None


def device_kind(device: dict[str, Any] | None) -> str | None:
    return first_code((device or {}).get("type"), DEVICE_KIND)


def identifier_value(resource: dict[str, Any], system: str) -> str | None:
    for identifier in resource.get("identifier") or []:
        if isinstance(identifier, dict) and identifier.get("system") == system and identifier.get("value"):
            return str(identifier["value"])
    return None


def reference_of(value: Any) -> str | None:
    reference = value.get("reference") if isinstance(value, dict) else None
    return reference if isinstance(reference, str) else None


def local_id(reference: str | None, resource_type: str) -> str | None:
    """The id of a relative reference to `resource_type` (`Device/abc` → `abc`), else None."""
    prefix = f"{resource_type}/"
    if reference and reference.startswith(prefix) and "/" not in reference[len(prefix):]:
        return reference[len(prefix):]
    return None

"""The names, codes and code systems of mutual recognition (DOMAIN.md §3), in one place.

The fixed code systems defined here are served as `CodeSystem` resources (loaded with the
catalog, see `results_sharing.load`), so a client can read every code the API answers with.
"""

from typing import Any

BASE = "http://county-alliance.org/fhir"
LOINC = "http://loinc.org"
RECOGNITION_ITEM = f"{BASE}/CodeSystem/recognition-item"
RECOGNITION_REASON = f"{BASE}/CodeSystem/recognition-reason"
NON_RECOGNITION_REASON = f"{BASE}/CodeSystem/non-recognition-reason"
DECISION_STATUS = f"{BASE}/CodeSystem/recognition-decision-status"
DECISION_INPUT = f"{BASE}/CodeSystem/recognition-decision-input"
RECOGNITION_SCOPE = f"{BASE}/CodeSystem/recognition-scope"
ITEM_CATEGORY = f"{BASE}/CodeSystem/recognition-item-category"
TASK_CODE = f"{BASE}/CodeSystem/task-code"
FACILITY_LEVEL = f"{BASE}/CodeSystem/facility-level"
RECOGNITION_MARK = f"{BASE}/StructureDefinition/recognition-mark"
QUALITY_EVALUATION = f"{BASE}/StructureDefinition/recognition-quality-evaluation"
CRITICAL_ACKNOWLEDGEMENT = f"{BASE}/StructureDefinition/critical-value-acknowledgement"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"

CATEGORIES = ("lab", "imaging", "ecg", "ultrasound", "nuclear")
# Scopes of a quality evaluation, widest first; a wider one covers every narrower one.
SCOPES = ("national", "provincial", "city", "alliance")
SCOPE_RANK = {scope: len(SCOPES) - index for index, scope in enumerate(SCOPES)}
MARK_LABELS = {"national": "全国HR", "provincial": "本省HR", "city": "本市HR", "alliance": "医共体HR"}
# The shared centers that produce results for recognition (sterile supply produces none).
RESULT_CENTERS = frozenset({"lab-center", "imaging-center", "ecg-center", "pathology-center"})
FINAL_STATUSES = frozenset({"final", "amended", "corrected", "appended"})
# A result in one of these statuses is no result at all: it leaves the recognition index.
WITHDRAWN_STATUSES = frozenset({"cancelled", "entered-in-error"})
CRITICAL_INTERPRETATIONS = frozenset({"AA", "HH", "LL"})
# DiagnosticReport categories whose content is a physician's diagnostic conclusion (Art. 2).
DIAGNOSTIC_CONCLUSION_CATEGORIES = frozenset({"SP", "CP", "PAT"})
ENCOUNTER_CLASSES = {"AMB": None, "EMER": "validity-days-emergency", "IMP": "validity-days-inpatient"}

REASONS: dict[str, str] = {
    "recognizable": "可互认",
    "not-in-catalog": "项目不在互认目录中",
    "diagnostic-conclusion": "医师诊断结论（如病理诊断）不互认，可申请会诊",
    "not-final": "结果尚未终审",
    "critical-unacknowledged": "危急值尚未确认接收",
    "expired": "超出项目互认时限",
    "no-eqa": "出具机构无该项目的质评（室间质评/影像质控）",
    "eqa-lapsed": "出具结果时机构的质评已失效",
    "scope": "质评范围不覆盖申请机构",
}

NON_RECOGNITION_REASONS: dict[str, tuple[str, bool]] = {
    # code: (display, counts as non-recognition)
    "01": ("因病情变化，检查检验结果与患者临床表现、疾病诊断不符，难以满足临床诊疗需求", True),
    "02": ("检查检验结果在疾病发展演变过程中变化较快", True),
    "03": ("检查检验项目对于疾病诊疗意义重大（如手术、输血等重大医疗措施前）", True),
    "04": ("患者处于急诊、急救、重型、危重型等紧急状态", True),
    "05": ("涉及司法、伤残、病退、劳动仲裁等鉴定", True),
    "06": ("国家规定需要相应资质的检测机构的检查检验项目", True),
    "07": ("诊治医师认为有必要进行再次检查", True),
    "08": ("其他情形确需复查", True),
    "98": ("医院未收到或患者未能提供外院资料无法诊断", False),
    "99": ("由于诊断或病情监测需要进行连续性检查/检验", False),
}

DECISION_STATUSES = {"recognized": "已互认", "not-recognized": "不互认"}
DECISION_INPUTS = {
    "item": "互认项目（目录版本）", "result": "被互认或未互认的既往结果", "producer": "结果出具机构",
    "category": "项目类别", "price": "项目价格（节约费用的依据）",
}
SCOPE_DISPLAYS = {"national": "全国", "provincial": "省级", "city": "市级", "alliance": "医共体"}
CATEGORY_DISPLAYS = {"lab": "检验", "imaging": "影像", "ecg": "心电", "ultrasound": "超声", "nuclear": "核医学"}


def loinc_check_digit_valid(code: str) -> bool:
    """LOINC codes end in a mod-10 (Luhn) check digit: `2823-3`. A typo is an unknown code."""
    number, _, check = code.partition("-")
    if not (number.isdigit() and check.isdigit() and len(check) == 1 and 0 < len(number) <= 7):
        return False
    total = 0
    for position, digit in enumerate(reversed(number)):
        value = int(digit) * (2 if position % 2 == 0 else 1)
        total += value // 10 + value % 10
    return (10 - total % 10) % 10 == int(check)


def codings(concept: Any) -> list[dict[str, Any]]:
    if not isinstance(concept, dict):
        return []
    return [c for c in concept.get("coding") or [] if isinstance(c, dict)]


def code_in(concepts: Any, system: str) -> str | None:
    """The first code of `system` among a CodeableConcept (or a list of them)."""
    for concept in concepts if isinstance(concepts, list) else [concepts]:
        for coding in codings(concept):
            if coding.get("system") == system and isinstance(coding.get("code"), str):
                return coding["code"]
    return None


def reference_of(value: Any) -> str | None:
    reference = value.get("reference") if isinstance(value, dict) else None
    return reference if isinstance(reference, str) else None


def fixed_code_systems() -> list[dict[str, Any]]:
    """The code systems whose content is part of the product, as CodeSystem resources."""

    def system(resource_id: str, url: str, title: str, concepts: list[dict[str, Any]],
               properties: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "resourceType": "CodeSystem", "id": resource_id, "url": url, "version": "1",
            "name": resource_id.title().replace("-", ""), "title": title, "status": "active",
            "content": "complete", "caseSensitive": True, "concept": concepts,
        }
        if properties:
            body["property"] = properties
        return body

    counts = {"code": "counts-as-non-recognition", "type": "boolean",
              "description": "Whether a decision with this reason counts against the recognition rate"}
    return [
        system("recognition-reason", RECOGNITION_REASON, "互认判断理由",
               [{"code": code, "display": display} for code, display in REASONS.items()]),
        system("non-recognition-reason", NON_RECOGNITION_REASON, "不互认原因", [
            {"code": code, "display": display,
             "property": [{"code": "counts-as-non-recognition", "valueBoolean": counts_as}]}
            for code, (display, counts_as) in NON_RECOGNITION_REASONS.items()
        ], [counts]),
        system("recognition-decision-status", DECISION_STATUS, "互认决定",
               [{"code": code, "display": display} for code, display in DECISION_STATUSES.items()]),
        system("recognition-decision-input", DECISION_INPUT, "互认决定记录的输入项",
               [{"code": code, "display": display} for code, display in DECISION_INPUTS.items()]),
        system("recognition-scope", RECOGNITION_SCOPE, "互认范围（质评级别）",
               [{"code": code, "display": display} for code, display in SCOPE_DISPLAYS.items()]),
        system("recognition-item-category", ITEM_CATEGORY, "互认项目类别",
               [{"code": code, "display": display} for code, display in CATEGORY_DISPLAYS.items()]),
    ]

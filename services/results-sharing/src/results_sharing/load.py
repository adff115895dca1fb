"""Loading recognition data: the catalog file (`alliance catalog load FILE`), the demo's quality
evaluations (`alliance demo load`), and the fixed code systems served at start-up.

Files go in through the results-sharing service's FHIR API as one transaction of PUTs with stable
ids (`CodeSystem/recognition-item-<version>`, `VerificationResult/<id>`), so loading the same
file twice writes nothing new and every check of the API applies. The catalog file format is in
docs/results-sharing.md.
"""

import uuid
from collections.abc import Awaitable, Callable
from datetime import date, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import orjson
import yaml

from fhirkit import jsonio
from fhirkit.errors import VersionConflict
from fhirkit.store.repository import Repository
from results_sharing import catalog
from results_sharing.vocabulary import (
    LOINC,
    QUALITY_EVALUATION,
    RECOGNITION_ITEM,
    RECOGNITION_SCOPE,
    V2_0074,
    fixed_code_systems,
)

Send = Callable[[bytes], Awaitable[tuple[int, bytes]]]
DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_CATALOG = DEMO_DIR / "recognition-catalog.yaml"
DEMO_QUALITY = DEMO_DIR / "quality-evaluations.yaml"
ITEM_FIELDS = {"code", "display", "category", "loinc", "validity_days", "validity_days_emergency",
               "validity_days_inpatient", "scope_required", "price"}


class RecognitionLoadError(RuntimeError):
    pass


async def publish_code_systems(app: Any) -> None:
    """Serve the fixed code systems (reasons, decision codes, scopes); an identical rewrite is a no-op."""
    service = app.state.service
    async with app.state.database.transaction(write=True) as conn:
        repo = Repository(conn, service.store)
        for code_system in fixed_code_systems():
            try:
                await repo.update("CodeSystem", code_system["id"], code_system)
            except VersionConflict:
                pass  # another replica starting at the same moment wrote it


# --- the catalog file ---------------------------------------------------------------------------

def catalog_code_system(path: Path) -> dict[str, Any]:
    """The catalog file as the `recognition-item` CodeSystem of its version (checked as on write)."""
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RecognitionLoadError(f"{path}: cannot read the catalog file: {exc}") from None
    if not isinstance(content, dict) or not isinstance(content.get("items"), list):
        raise RecognitionLoadError(f"{path}: a catalog file has 'catalog', 'version' and a list of 'items'")
    version = str(content.get("version") or "")
    if not version:
        raise RecognitionLoadError(f"{path}: the catalog needs a version")
    concepts = [_concept(path, index, item) for index, item in enumerate(content["items"])]
    code_system = {
        "resourceType": "CodeSystem",
        "id": f"recognition-item-{version}",
        "url": RECOGNITION_ITEM,
        "version": version,
        "name": "RecognitionItem",
        "title": str(content.get("catalog") or "检查检验结果互认项目目录"),
        "status": "active",
        "content": "complete",
        "caseSensitive": True,
        "count": len(concepts),
        "property": [
            {"code": code, "type": kind, "description": text} for code, (kind, text) in catalog.PROPERTIES.items()
        ],
        "concept": concepts,
    }
    if content.get("date"):
        code_system["date"] = str(content["date"])
    if content.get("publisher"):
        code_system["publisher"] = str(content["publisher"])
    try:
        catalog.items(code_system)
    except Exception as exc:  # the same checks as the API's, reported with the file's name
        raise RecognitionLoadError(f"{path}: {getattr(exc, 'diagnostics', exc)}") from None
    return code_system


def _concept(path: Path, index: int, item: Any) -> dict[str, Any]:
    where = f"{path}: items[{index}]"
    if not isinstance(item, dict) or not {"code", "display"} <= set(item):
        raise RecognitionLoadError(f"{where} needs at least code and display")
    unknown = set(item) - ITEM_FIELDS
    if unknown:
        raise RecognitionLoadError(f"{where} has unknown field(s) {', '.join(sorted(unknown))}")
    properties: list[dict[str, Any]] = []
    for field, prop, kind in (("category", "category", "valueCode"), ("loinc", "loinc", "valueCode"),
                              ("validity_days", "validity-days", "valueInteger"),
                              ("validity_days_emergency", "validity-days-emergency", "valueInteger"),
                              ("validity_days_inpatient", "validity-days-inpatient", "valueInteger"),
                              ("scope_required", "scope-required", "valueCode")):
        if item.get(field) is not None:
            properties.append({"code": prop, kind: item[field] if kind == "valueInteger" else str(item[field])})
    if item.get("price") is not None:
        try:
            price = Decimal(str(item["price"])).quantize(Decimal("0.01"))
        except InvalidOperation:
            raise RecognitionLoadError(f"{where}: price '{item['price']}' is not a number") from None
        properties.append({"code": "price", "valueDecimal": price})
    return {"code": str(item["code"]), "display": str(item["display"]), "property": properties}


async def load_catalog(path: Path, send: Send) -> str:
    code_system = catalog_code_system(path)
    await _transaction(send, [code_system], str(path))
    return f"recognition catalog {code_system['version']}: {code_system['count']} items"


# --- the demo's quality evaluations -------------------------------------------------------------

def demo_quality_records(today: date) -> list[dict[str, Any]]:
    """The demo centers' evaluations, current whenever the demo is loaded: each runs from 1 January
    of last year to 31 December of next year (re-loading in a later year moves them on)."""
    content = yaml.safe_load(DEMO_QUALITY.read_text(encoding="utf-8"))
    start, end = f"{today.year - 1}-01-01", f"{today.year + 1}-12-31"
    return [_verification_result(record, start, end) for record in content["evaluations"]]


def _verification_result(record: dict[str, Any], start: str, end: str) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [
        {"url": "scope", "valueCode": record["scope"]},
        {"url": "period", "valuePeriod": {"start": start, "end": end}},
        *({"url": "item", "valueCoding": {"system": RECOGNITION_ITEM, "code": code}} for code in record.get("items", [])),
        *({"url": "category", "valueCode": category} for category in record.get("categories", [])),
    ]
    return {
        "resourceType": "VerificationResult",
        "id": record["id"],
        "extension": [{"url": QUALITY_EVALUATION, "extension": parts}],
        "target": [{"reference": f"Organization/{record['organization']}"}],
        "need": {"text": "periodic"},
        "status": "validated",
        "statusDate": start,
        "validationType": {"text": "primary"},
        "validationProcess": [{"text": record["program"]}],
        "primarySource": [{
            "who": {"display": record["evaluator"]},
            "type": [{"coding": [{"system": RECOGNITION_SCOPE, "code": record["scope"]}]}],
            "validationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/validation-status",
                                             "code": "successful"}]},
        }],
        "nextScheduled": end,
    }


async def load_demo(send: Send, today: date | None = None) -> str:
    """The demo catalog and the demo centers' current quality evaluations."""
    loaded = await load_catalog(DEMO_CATALOG, send)
    records = demo_quality_records(today or date.today())
    await _transaction(send, records, str(DEMO_QUALITY))
    return f"{loaded}; {len(records)} quality evaluations"


async def _transaction(send: Send, resources: list[dict[str, Any]], source: str) -> None:
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"{r['resourceType']}/{r['id']}", "resource": r,
         "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
        for r in resources
    ]}
    status, body = await send(jsonio.dumps(bundle))
    if status != 200:
        try:
            issues = orjson.loads(body).get("issue") or [{}]
            reason = issues[0].get("diagnostics") or body.decode("utf-8", "replace")
        except orjson.JSONDecodeError:
            reason = body.decode("utf-8", "replace")[:500]
        raise RecognitionLoadError(f"{source}: refused ({status}): {reason}")



# --- demo results: a few recent lab results, so that a recognition check finds something --------

DEMO_LAB = "Organization/qingxi-lab-center"
DEMO_RESULT_PATIENTS = ("pat-0011", "pat-0012", "pat-0013")
DEMO_REPORT_NUMBERS = "http://county-alliance.org/fhir/sid/report-number"
# (LOINC, display, value, UCUM unit, reference range)
DEMO_LAB_ITEMS = (
    ("2823-3", "血清钾", 4.1, "mmol/L", (3.5, 5.3)),
    ("2951-2", "血清钠", 140, "mmol/L", (137, 147)),
)


def demo_results(today: date) -> list[dict[str, Any]]:
    """Each demo patient's electrolyte panel from the county lab center, taken two days ago."""
    taken = f"{(today - timedelta(days=2)).isoformat()}T09:00:00+08:00"
    resources: list[dict[str, Any]] = []
    for patient in DEMO_RESULT_PATIENTS:
        observations = [_demo_observation(patient, taken, *item) for item in DEMO_LAB_ITEMS]
        report = {
            "resourceType": "DiagnosticReport", "identifier": [_demo_number(f"{patient}-panel")], "status": "final",
            "category": [{"coding": [{"system": V2_0074, "code": "CH"}]}],
            "code": {"coding": [{"system": LOINC, "code": "24326-1", "display": "Electrolytes panel"}], "text": "电解质"},
            "subject": {"reference": f"Patient/{patient}"}, "effectiveDateTime": taken, "issued": taken,
            "performer": [{"reference": DEMO_LAB}],
            "result": [{"reference": f"urn:uuid:{_demo_uuid(o)}"} for o in observations],
        }
        resources += [*observations, report]
    return resources


def _demo_observation(patient: str, taken: str, loinc: str, display: str, value: float, unit: str,
                      normal: tuple[float, float]) -> dict[str, Any]:
    def quantity(amount: float) -> dict[str, Any]:
        return {"value": amount, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}

    return {
        "resourceType": "Observation", "identifier": [_demo_number(f"{patient}-{loinc}")], "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "laboratory"}]}],
        "code": {"coding": [{"system": LOINC, "code": loinc, "display": display}], "text": display},
        "subject": {"reference": f"Patient/{patient}"}, "effectiveDateTime": taken,
        "performer": [{"reference": DEMO_LAB}], "valueQuantity": quantity(value),
        "referenceRange": [{"low": quantity(normal[0]), "high": quantity(normal[1])}],
    }


def _demo_number(value: str) -> dict[str, str]:
    return {"system": DEMO_REPORT_NUMBERS, "value": f"DEMO-{value}"}


def _demo_uuid(resource: dict[str, Any]) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, resource["identifier"][0]["value"]))


async def load_demo_results(send: Send, today: date | None = None) -> str:
    """Posted as the lab center (the producer posts its results); re-loading updates, never duplicates."""
    resources = demo_results(today or date.today())
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"urn:uuid:{_demo_uuid(r)}", "resource": r,
         "request": {"method": "PUT", "url": f"{r['resourceType']}?identifier={DEMO_REPORT_NUMBERS}|"
                                              f"{r['identifier'][0]['value']}"}}
        for r in resources
    ]}
    status, body = await send(jsonio.dumps(bundle))
    if status != 200:
        raise RecognitionLoadError(f"demo results refused ({status}): {body.decode('utf-8', 'replace')[:500]}")
    return f"{len(resources)} demo results from {DEMO_LAB} for {', '.join(DEMO_RESULT_PATIENTS)}"

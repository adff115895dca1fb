"""Results sharing and mutual recognition through the gateway: ingest from each center, the HR
mark, `$recognition-check` with every reason, decision records and `$recognition-statistics`.

The demo alliance (directory), the demo recognition catalog and the demo centers' quality
evaluations are loaded once, exactly as `alliance demo load` loads them. Each test uses its own
demo patients, so tests do not see each other's results.
"""

import base64
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.support import eventually, outcome_code

BASE = "http://county-alliance.org/fhir"
LOINC = "http://loinc.org"
ITEM = f"{BASE}/CodeSystem/recognition-item"
MARK = f"{BASE}/StructureDefinition/recognition-mark"
ACK = f"{BASE}/StructureDefinition/critical-value-acknowledgement"
QUALITY = f"{BASE}/StructureDefinition/recognition-quality-evaluation"
TASK_CODE = f"{BASE}/CodeSystem/task-code"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
NATIONAL_ID = "urn:oid:2.16.156.10011.1.3"
LAB = "Organization/qingxi-lab-center"
IMAGING = "Organization/qingxi-imaging-center"
ECG = "Organization/qingxi-ecg-center"
PATHOLOGY = "Organization/qingxi-pathology-center"
TOWNSHIP = "Organization/thc-xikou"
PROVINCIAL = "Organization/zhejiang-tongren-hospital"  # a partner hospital in 杭州市, outside the alliance
REPORT_SYSTEM = f"{BASE}/sid/report-number"


@pytest.fixture(scope="module")
async def demo(system: Any) -> None:
    from directory.directory_file import parse_directory_file
    from directory.load import load_directory
    from results_sharing.load import load_demo
    from servicekit.peers import SYSTEM_IDENTITY

    gateway = system.state.gateway

    def sender(service: str) -> Any:
        async def send(body: bytes) -> tuple[int, bytes]:
            upstream = await gateway.send(service, "POST", "/fhir", identity=SYSTEM_IDENTITY,
                                          headers={"content-type": "application/fhir+json"}, content=body)
            return upstream.status, upstream.content
        return send

    demo_file = Path(__file__).resolve().parents[1] / "services/directory/src/directory/demo/alliance.yaml"
    await load_directory(parse_directory_file(demo_file), sender("directory"))
    await load_demo(sender("results-sharing"))


def ago(days: float = 0, hours: float = 0) -> str:
    moment = datetime.now(UTC) - timedelta(days=days, hours=hours)
    return moment.strftime("%Y-%m-%dT%H:%M:%S+00:00")


def identifier(prefix: str = "R") -> dict[str, str]:
    return {"system": REPORT_SYSTEM, "value": f"{prefix}{uuid.uuid4().hex[:12]}"}


def observation(patient: str, producer: str, loinc: str, display: str, *, value: Any = None, unit: str = "mmol/L",
                status: str = "final", effective: str | None = None, interpretation: str | None = None,
                **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Observation", "identifier": [identifier("O")], "status": status,
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "laboratory"}]}],
        "code": {"coding": [{"system": LOINC, "code": loinc, "display": display}], "text": display},
        "subject": {"reference": patient}, "effectiveDateTime": effective or ago(days=1),
        "performer": [{"reference": producer}],
    }
    if value is not None:
        body["valueQuantity"] = {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}
        body["referenceRange"] = [{"low": {"value": 3.5, "unit": unit, "system": "http://unitsofmeasure.org",
                                           "code": unit},
                                   "high": {"value": 5.3, "unit": unit, "system": "http://unitsofmeasure.org",
                                            "code": unit}}]
    if interpretation:
        body["interpretation"] = [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", "code": interpretation}]}]
    body.update(extra)
    return body


def report(patient: str, producer: str, loinc: str, display: str, category: str, results: list[str], *,
           status: str = "final", effective: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "DiagnosticReport", "identifier": [identifier("D")], "status": status,
        "category": [{"coding": [{"system": V2_0074, "code": category}]}],
        "code": {"coding": [{"system": LOINC, "code": loinc, "display": display}]},
        "subject": {"reference": patient}, "effectiveDateTime": effective or ago(days=1), "issued": ago(hours=20),
        "performer": [{"reference": producer}], "result": [{"reference": r} for r in results], **extra,
    }


def transaction(*resources: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A center's upload: conditional updates by identifier, entries linked by urn:uuid."""
    urls = [f"urn:uuid:{uuid.uuid4()}" for _ in resources]
    entries = []
    for url, body in zip(urls, resources):
        ident = (body.get("identifier") or [None])[0]
        request = ({"method": "PUT", "url": f"{body['resourceType']}?identifier={ident['system']}|{ident['value']}"}
                   if ident else {"method": "POST", "url": body["resourceType"]})
        entries.append({"fullUrl": url, "resource": body, "request": request})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}, urls


async def upload(api: Any, center: str, bundle: dict[str, Any], expected: int = 200) -> Any:
    response = await api.post("", bundle, organization=center, level="center")
    assert response.status_code == expected, response.text
    return response


def locations(response: Any) -> list[str]:
    return ["/".join(e["response"]["location"].split("/")[-4:-2]) for e in response.json()["entry"]]


async def lab_result(api: Any, patient: str, loinc: str = "2823-3", display: str = "钾", *, producer: str = LAB,
                     value: float = 4.1, **changes: Any) -> str:
    """One lab Observation in its report, uploaded by its producer; returns Observation/id."""
    obs = observation(patient, producer, loinc, display, value=value, **changes)
    rep = report(patient, producer, "24323-8", "生化检验报告", "CH", [], status=obs["status"],
                 effective=obs["effectiveDateTime"])
    bundle, urls = transaction(obs, rep)
    rep["result"] = [{"reference": urls[0]}]
    return locations(await upload(api, producer, bundle))[0]


async def check(api: Any, patient: Any, code: dict[str, str], *, caller: str = TOWNSHIP, level: str = "township",
                **params: Any) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {"name": "patient", **({"valueReference": {"reference": patient}} if isinstance(patient, str)
                               else {"valueIdentifier": patient})},
        {"name": "code", "valueCoding": code},
    ]
    for name, value in params.items():
        key = {"requester": "valueReference", "asOf": "valueDateTime", "encounter_class": "valueCode"}[name]
        parameters.append({"name": name.replace("_", "-"),
                           key: {"reference": value} if key == "valueReference" else value})
    response = await api.post("$recognition-check", {"resourceType": "Parameters", "parameter": parameters},
                              organization=caller, level=level)
    assert response.status_code == 200, response.text
    return response.json()


@contextmanager
def paths_asked_of_peers(system: Any) -> Iterator[list[str]]:
    """The paths results-sharing's peer client asks other services for, while inside."""
    peers = system.state.apps["results-sharing"].state.peers
    asked: list[str] = []
    original = peers._get

    async def counting(service: str, path: str) -> Any:
        asked.append(path)
        return await original(service, path)

    peers._get = counting
    try:
        yield asked
    finally:
        del peers._get


def value(parameters: list[dict[str, Any]], name: str) -> Any:
    for part in parameters:
        if part["name"] == name:
            return next(v for k, v in part.items() if k.startswith("value") or k == "part")
    return None


def candidates(answer: dict[str, Any]) -> list[dict[str, Any]]:
    return [{p["name"]: next(v for k, v in p.items() if k.startswith("value")) for p in c["part"]}
            for c in answer["parameter"] if c["name"] == "candidate"]


async def check_grants(system: Any, patient: str) -> list[tuple[str, int]]:
    """The township's recognition-check grants of the patient: (target, expiry), oldest first."""
    from sqlalchemy import select

    from fhirkit.store.tables import access_grant

    grant = access_grant.c
    async with system.state.apps["results-sharing"].state.database.transaction(write=False) as conn:
        rows = await conn.execute(
            select(grant.target_type, grant.target_id, grant.expires_at)
            .where(grant.patient_id == patient.split("/")[1], grant.source == f"recognition-check#{TOWNSHIP}")
            .order_by(grant.gid))
        return [(f"{row[0]}/{row[1]}", row[2]) for row in rows]


def reasons(answer: dict[str, Any]) -> list[str]:
    return [c["reason"]["code"] for c in candidates(answer)]


def mark(resource: dict[str, Any]) -> dict[str, Any] | None:
    for extension in resource.get("extension") or []:
        if extension["url"] == MARK:
            return {p["url"]: next(v for k, v in p.items() if k.startswith("value")) for p in extension["extension"]}
    return None


POTASSIUM = {"system": LOINC, "code": "2823-3"}
pytestmark = pytest.mark.usefixtures("demo")


# ------------------------------------------------------------------------------ catalog and quality

class TestCatalog:
    async def test_the_demo_catalog_and_the_fixed_code_systems_are_served(self, api: Any) -> None:
        found = (await api.get(f"CodeSystem?url={ITEM}")).json()
        catalog = found["entry"][0]["resource"]
        assert catalog["version"] == "2026.1" and len(catalog["concept"]) >= 40
        categories = {p["valueCode"] for c in catalog["concept"] for p in c["property"] if p["code"] == "category"}
        assert categories == {"lab", "imaging", "ecg", "ultrasound"}
        reasons_cs = (await api.get("CodeSystem/non-recognition-reason")).json()
        counted = {c["code"]: c["property"][0]["valueBoolean"] for c in reasons_cs["concept"]}
        assert counted["98"] is False and counted["99"] is False and counted["01"] is True

    async def test_a_catalog_with_a_wrong_loinc_check_digit_is_refused(self, api: Any, tmp_path: Path) -> None:
        from results_sharing.load import RecognitionLoadError, catalog_code_system

        path = tmp_path / "catalog.yaml"
        path.write_text("version: x1\nitems:\n  - {code: K, display: 钾, category: lab, loinc: 2823-4, "
                        "validity_days: 7, scope_required: alliance, price: 5}\n", encoding="utf-8")
        with pytest.raises(RecognitionLoadError, match="2823-4"):
            catalog_code_system(path)
        body = {"resourceType": "CodeSystem", "url": ITEM, "version": "bad", "status": "draft", "content": "complete",
                "concept": [{"code": "K", "display": "钾", "property": [{"code": "category", "valueCode": "blood"}]}]}
        response = await api.put("CodeSystem/recognition-item-bad", {**body, "id": "recognition-item-bad"})
        assert response.status_code == 422 and outcome_code(response) == "business-rule"
        assert "lacks" in response.json()["issue"][0]["diagnostics"]

    async def test_a_quality_evaluation_names_scope_period_and_known_items(self, api: Any) -> None:
        record = {"resourceType": "VerificationResult", "status": "validated",
                  "target": [{"reference": LAB}],
                  "extension": [{"url": QUALITY, "extension": [
                      {"url": "scope", "valueCode": "provincial"},
                      {"url": "period", "valuePeriod": {"start": "2026-01-01", "end": "2026-12-31"}},
                      {"url": "item", "valueCoding": {"system": ITEM, "code": "NOT-AN-ITEM"}}]}]}
        unknown = await api.post("VerificationResult", record)
        assert unknown.status_code == 422 and "NOT-AN-ITEM" in unknown.json()["issue"][0]["diagnostics"]
        no_period = {**record, "extension": [{"url": QUALITY, "extension": [
            {"url": "scope", "valueCode": "provincial"}, {"url": "category", "valueCode": "lab"}]}]}
        assert (await api.post("VerificationResult", no_period)).status_code == 422


# ------------------------------------------------------------------------------ ingest

class TestIngest:
    async def test_lab_center_uploads_a_report_with_units_ranges_and_the_hr_mark(self, api: Any) -> None:
        patient = "Patient/pat-0101"
        specimen = {"resourceType": "Specimen", "identifier": [identifier("S")], "subject": {"reference": patient},
                    "type": {"text": "血清"}, "collection": {"collectedDateTime": ago(days=1, hours=2)}}
        potassium = observation(patient, LAB, "2823-3", "钾", value=4.12)
        glucose = observation(patient, LAB, "3016-3", "促甲状腺激素", value=2.1, unit="m[IU]/L")
        rep = report(patient, LAB, "24323-8", "生化检验报告", "CH", [])
        bundle, urls = transaction(specimen, potassium, glucose, rep)
        potassium["specimen"] = glucose["specimen"] = {"reference": urls[0]}
        rep["result"] = [{"reference": urls[1]}, {"reference": urls[2]}]
        stored = locations(await upload(api, LAB, bundle))
        read = (await api.get(stored[1], organization=LAB, level="center")).json()
        assert read["valueQuantity"] == potassium["valueQuantity"]  # UCUM unit and decimals as sent
        assert read["referenceRange"] == potassium["referenceRange"]
        assert mark(read)["label"] == "全国HR" and mark(read)["item"]["code"] == "LAB-K"
        # TSH has only the provincial evaluation of the whole lab category; potassium also a national one.
        assert mark((await api.get(stored[2], organization=LAB, level="center")).json())["label"] == "本省HR"

    async def test_resending_the_same_report_updates_it_and_an_amendment_keeps_history(self, api: Any) -> None:
        patient = "Patient/pat-0102"
        obs = observation(patient, LAB, "2823-3", "钾", value=4.0)
        rep = report(patient, LAB, "24323-8", "生化检验报告", "CH", [])
        bundle, urls = transaction(obs, rep)
        rep["result"] = [{"reference": urls[0]}]
        first = locations(await upload(api, LAB, bundle))
        again = locations(await upload(api, LAB, bundle))
        assert again == first
        assert (await api.get(first[0], organization=LAB, level="center")).json()["meta"]["versionId"] == "1"  # an identical re-send writes nothing
        obs["status"], obs["valueQuantity"]["value"] = "amended", 4.4
        amended = locations(await upload(api, LAB, bundle))
        assert amended == first
        history = (await api.get(f"{first[0]}/_history", organization=LAB, level="center")).json()
        assert [e["resource"]["status"] for e in history["entry"]] == ["amended", "final"]
        ident = obs["identifier"][0]
        found = (await api.get(f"Observation?identifier={ident['system']}|{ident['value']}", organization=LAB,
                               level="center")).json()
        assert found["total"] == 1
        duplicate = await api.post("Observation", obs, organization=LAB, level="center")
        assert duplicate.status_code == 422 and "PUT Observation?identifier=" in duplicate.text

    @pytest.mark.parametrize(("change", "element"), [
        ({"subject": {"reference": "Patient/nobody-here"}}, "Observation.subject"),
        ({"code": {"coding": [{"system": LOINC, "code": "2823-4"}]}}, "Observation.code"),
        ({"code": {"coding": [{"system": ITEM, "code": "LAB-UNKNOWN"}]}}, "Observation.code"),
        ({"code": {"text": "血钾"}}, "Observation.code"),
        ({"performer": [{"reference": "Organization/no-such-lab"}]}, "Observation.performer"),
        ({"identifier": None}, "Observation.identifier"),
    ])
    async def test_an_unknown_patient_producer_or_code_refuses_the_whole_upload(
            self, api: Any, change: dict[str, Any], element: str) -> None:
        patient = "Patient/pat-0103"
        good = observation(patient, LAB, "718-7", "血红蛋白", value=135, unit="g/L")
        bad = {k: v for k, v in {**observation(patient, LAB, "2823-3", "钾", value=4.0), **change}.items()
               if v is not None}
        rep = report(patient, LAB, "58410-2", "血常规", "HM", [])
        bundle, urls = transaction(good, bad, rep)
        rep["result"] = [{"reference": urls[0]}, {"reference": urls[1]}]
        if "identifier" in change:
            bundle["entry"][1]["request"] = {"method": "POST", "url": "Observation"}
        response = await upload(api, LAB, bundle, expected=422)
        issue = response.json()["issue"][0]
        assert element in " ".join(issue.get("expression", [])) + issue["diagnostics"]
        ident = good["identifier"][0]
        assert (await api.get(f"Observation?identifier={ident['system']}|{ident['value']}", organization=LAB,
                              level="center")).json()["total"] == 0

    async def test_imaging_center_references_the_pacs_endpoint(self, api: Any) -> None:
        patient = "Patient/pat-0104"
        study = {"resourceType": "ImagingStudy", "identifier": [{"system": "urn:dicom:uid",
                                                                 "value": f"urn:oid:1.2.156.{uuid.uuid4().int % 10**12}"}],
                 "status": "available", "subject": {"reference": patient}, "started": ago(days=3),
                 "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}],
                 "endpoint": [{"reference": "Endpoint/ep-qingxi-pacs-wado"}], "numberOfSeries": 1,
                 "numberOfInstances": 240}
        rep = report(patient, IMAGING, "24627-2", "胸部CT平扫", "RAD", [], effective=ago(days=3),
                     conclusion="双肺未见明显异常")
        bundle, urls = transaction(study, rep)
        rep["imagingStudy"] = [{"reference": urls[0]}]
        stored = locations(await upload(api, IMAGING, bundle))
        assert mark((await api.get(stored[1], organization=IMAGING, level="center")).json())["label"] == "本省HR"
        answer = await check(api, patient, {"system": ITEM, "code": "IMG-CT-CHEST"})
        assert value(answer["parameter"], "recognizable") is True
        assert candidates(answer)[0]["result"]["reference"] == stored[1]
        study["endpoint"] = [{"reference": "Endpoint/ep-does-not-exist"}]
        study["identifier"] = [identifier("I")]
        bundle, _ = transaction(study)
        assert (await upload(api, IMAGING, bundle, expected=422)).json()["issue"][0]["code"] == "processing"

    async def test_ecg_center_uploads_waveform_measurements_and_pdf(self, api: Any) -> None:
        patient = "Patient/pat-0105"
        waveform = observation(patient, ECG, "11524-6", "心电图", effective=ago(days=2))
        waveform["component"] = [{"code": {"coding": [{"system": "urn:oid:2.16.840.1.113883.6.24", "code": "131329"}]},
                                  "valueSampledData": {"origin": {"value": 2048}, "period": 2, "factor": 1.612,
                                                       "dimensions": 1, "data": "2041 2043 2047 2052 2048"}}]
        rate = observation(patient, ECG, "8867-4", "心率", value=72, unit="/min", effective=ago(days=2))
        pdf = {"resourceType": "DocumentReference", "status": "current", "subject": {"reference": patient},
               "type": {"coding": [{"system": LOINC, "code": "11524-6"}]},
               "content": [{"attachment": {"contentType": "application/pdf", "data": "JVBERi0xLjQK"}}]}
        rep = report(patient, ECG, "11524-6", "常规心电图报告", "EC", [], effective=ago(days=2),
                     conclusion="窦性心律，正常心电图")
        bundle, urls = transaction(waveform, rate, pdf, rep)
        rep["result"] = [{"reference": urls[0]}, {"reference": urls[1]}]
        rep["presentedForm"] = [{"contentType": "application/pdf", "url": urls[2]}]
        bundle["entry"][2]["request"] = {"method": "POST", "url": "DocumentReference"}
        stored = locations(await upload(api, ECG, bundle))
        read = (await api.get(stored[0], organization=ECG, level="center")).json()
        assert read["component"][0]["valueSampledData"]["factor"] == 1.612
        assert mark((await api.get(stored[3], organization=ECG, level="center")).json())["label"] == "本市HR"

    async def test_pathology_center_uploads_a_specimen_hierarchy_and_a_diagnosis(self, api: Any) -> None:
        patient = "Patient/pat-0106"
        part = {"resourceType": "Specimen", "identifier": [identifier("P")], "subject": {"reference": patient},
                "type": {"text": "胃窦活检组织"}}
        block = {"resourceType": "Specimen", "identifier": [identifier("B")], "subject": {"reference": patient},
                 "type": {"text": "蜡块"}}
        slide = {"resourceType": "Specimen", "identifier": [identifier("L")], "subject": {"reference": patient},
                 "type": {"text": "HE切片"}}
        rep = report(patient, PATHOLOGY, "60567-5", "病理诊断报告", "SP", [], effective=ago(days=5),
                     conclusion="（胃窦）慢性非萎缩性胃炎")
        bundle, urls = transaction(part, block, slide, rep)
        block["parent"], slide["parent"] = [{"reference": urls[0]}], [{"reference": urls[1]}]
        rep["specimen"] = [{"reference": urls[2]}]
        stored = locations(await upload(api, PATHOLOGY, bundle))
        assert (await api.get(stored[2], organization=PATHOLOGY, level="center")).json()["parent"][0]["reference"] == stored[1]
        answer = await check(api, patient, {"system": LOINC, "code": "60567-5"})
        assert reasons(answer) == ["diagnostic-conclusion"]
        assert value(answer["parameter"], "recognizable") is False


# ------------------------------------------------------------------------------ $recognition-check

class TestRecognitionCheck:
    async def test_a_fresh_result_is_recognizable_with_its_figures(self, api: Any) -> None:
        patient = "Patient/pat-0110"
        result = await lab_result(api, patient, effective=ago(days=2, hours=1))
        answer = await check(api, patient, POTASSIUM)
        assert value(answer["parameter"], "recognizable") is True
        assert value(answer["parameter"], "item")["code"] == "LAB-K"
        [candidate] = candidates(answer)
        assert candidate["result"]["reference"] == result
        assert candidate["producer"]["reference"] == LAB
        assert (candidate["mark"], candidate["reason"]["code"], candidate["recognizable"]) == ("全国HR", "recognizable", True)
        assert (candidate["age-days"], candidate["validity-days"]) == (2, 7)
        expires = datetime.fromisoformat(candidate["expires"].replace("Z", "+00:00"))
        assert timedelta(days=4) < expires - datetime.now(UTC) < timedelta(days=5)

    async def test_by_national_id_by_catalog_code_and_by_get(self, api: Any) -> None:
        patient = await api.get("Patient/pat-0111")
        national_id = next(i["value"] for i in patient.json()["identifier"] if i["system"] == NATIONAL_ID)
        result = await lab_result(api, "Patient/pat-0111")
        by_id = await check(api, {"system": NATIONAL_ID, "value": national_id}, {"system": ITEM, "code": "LAB-K"})
        assert candidates(by_id)[0]["result"]["reference"] == result
        response = await api.get(f"$recognition-check?patient={NATIONAL_ID}|{national_id}&code={LOINC}|2823-3",
                                 organization=TOWNSHIP, level="township")
        assert response.status_code == 200 and reasons(response.json()) == ["recognizable"]

    async def test_the_best_candidate_comes_first(self, api: Any) -> None:
        patient = "Patient/pat-0112"
        old = await lab_result(api, patient, effective=ago(days=20))
        fresh = await lab_result(api, patient, effective=ago(days=1))
        preliminary = await lab_result(api, patient, effective=ago(hours=2), status="preliminary")
        answer = await check(api, patient, POTASSIUM)
        assert [c["result"]["reference"] for c in candidates(answer)] == [fresh, preliminary, old]
        assert reasons(answer) == ["recognizable", "not-final", "expired"]

    async def test_each_result_once_and_only_the_newest_twenty(self, api: Any) -> None:
        # A potassium result is kept under its catalog code and its LOINC, and the check reads both:
        # each result is answered once, newest first, at most MAX_CANDIDATES of them.
        from results_sharing.recognition import MAX_CANDIDATES

        patient = "Patient/pat-0125"
        stored = [await lab_result(api, patient, effective=ago(days=days)) for days in range(MAX_CANDIDATES + 2)]
        answer = await check(api, patient, POTASSIUM)
        assert [c["result"]["reference"] for c in candidates(answer)] == stored[:MAX_CANDIDATES]
        assert reasons(answer)[:7] == ["recognizable"] * 7 and set(reasons(answer)[7:]) == {"expired"}

    async def test_expired_and_the_encounter_class_validity(self, api: Any) -> None:
        patient = "Patient/pat-0113"
        await lab_result(api, patient, effective=ago(days=2))
        assert reasons(await check(api, patient, POTASSIUM)) == ["recognizable"]
        assert reasons(await check(api, patient, POTASSIUM, encounter_class="EMER")) == ["expired"]
        as_of = (datetime.now(UTC) + timedelta(days=6)).strftime("%Y-%m-%dT%H:%M:%SZ")
        assert reasons(await check(api, patient, POTASSIUM, asOf=as_of)) == ["expired"]

    async def test_no_quality_evaluation_and_a_lapsed_one(self, api: Any) -> None:
        center = await _lab_center(api, "无质评检验所")
        patient = "Patient/pat-0114"
        await lab_result(api, patient, producer=center, effective=ago(days=1))
        assert reasons(await check(api, patient, POTASSIUM)) == ["no-eqa"]
        lapsed_center = await _lab_center(api, "质评过期检验所")
        lapsed = {"resourceType": "VerificationResult", "status": "validated", "target": [{"reference": lapsed_center}],
                  "extension": [{"url": QUALITY, "extension": [
                      {"url": "scope", "valueCode": "national"},
                      {"url": "period", "valuePeriod": {"start": ago(days=400)[:10], "end": ago(days=30)[:10]}},
                      {"url": "category", "valueCode": "lab"}]}]}
        assert (await api.post("VerificationResult", lapsed)).status_code == 201
        result = await lab_result(api, "Patient/pat-0115", producer=lapsed_center, effective=ago(days=1))
        assert reasons(await check(api, "Patient/pat-0115", POTASSIUM)) == ["eqa-lapsed"]
        assert mark((await api.get(result, organization=lapsed_center, level="center")).json()) is None  # no HR mark: nothing was in force when it was produced

    async def test_scope_must_cover_the_requester(self, api: Any) -> None:
        patient = "Patient/pat-0116"
        ecg = observation(patient, ECG, "11524-6", "心电图", effective=ago(days=1))
        bundle, _ = transaction(ecg)
        await upload(api, ECG, bundle)
        item = {"system": ITEM, "code": "ECG-12"}
        assert reasons(await check(api, patient, item)) == ["recognizable"]  # a township center of the alliance
        outside = await check(api, patient, item, requester=PROVINCIAL)  # 杭州市: the city scope does not reach it
        assert reasons(outside) == ["scope"] and value(outside["parameter"], "recognizable") is False
        await lab_result(api, patient, effective=ago(days=1))
        assert reasons(await check(api, patient, POTASSIUM, requester=PROVINCIAL)) == ["recognizable"]  # national

    async def test_a_critical_value_is_recognizable_only_once_acknowledged(self, api: Any) -> None:
        patient = "Patient/pat-0117"
        obs = observation(patient, LAB, "2823-3", "钾", value=2.6, interpretation="LL")
        rep = report(patient, LAB, "24323-8", "生化检验报告", "CH", [])
        bundle, urls = transaction(obs, rep)
        rep["result"] = [{"reference": urls[0]}]
        stored = locations(await upload(api, LAB, bundle))
        assert reasons(await check(api, patient, POTASSIUM)) == ["critical-unacknowledged"]
        panel = await check(api, patient, {"system": LOINC, "code": "24323-8"})
        assert reasons(panel) == ["not-in-catalog"]  # the panel code is no catalog item
        obs["extension"] = [{"url": ACK, "extension": [
            {"url": "acknowledgedBy", "valueReference": {"reference": "Organization/thc-xikou"}},
            {"url": "acknowledgedAt", "valueDateTime": ago(hours=20)}]}]
        assert locations(await upload(api, LAB, bundle)) == stored
        assert reasons(await check(api, patient, POTASSIUM)) == ["recognizable"]

    async def test_an_item_outside_the_catalog(self, api: Any) -> None:
        patient = "Patient/pat-0118"
        result = await lab_result(api, patient, "2345-7", "葡萄糖（质量浓度）", value=100, unit="mg/dL")
        answer = await check(api, patient, {"system": LOINC, "code": "2345-7"})
        assert value(answer["parameter"], "reason")["code"] == "not-in-catalog"
        assert candidates(answer)[0]["result"]["reference"] == result
        assert reasons(answer) == ["not-in-catalog"]

    async def test_it_sees_every_producers_results_and_none_of_other_patients(self, api: Any) -> None:
        patient, other = "Patient/pat-0119", "Patient/pat-0120"
        await lab_result(api, other)
        empty = await check(api, patient, POTASSIUM)
        assert candidates(empty) == [] and value(empty["parameter"], "recognizable") is False
        center = await _lab_center(api, "乡镇检验点")
        elsewhere = await lab_result(api, patient, producer=center, effective=ago(hours=3))
        ours = await lab_result(api, patient, effective=ago(days=1))
        answer = await check(api, patient, POTASSIUM)
        assert [c["result"]["reference"] for c in candidates(answer)] == [ours, elsewhere]
        assert reasons(answer) == ["recognizable", "no-eqa"]

    async def test_the_directory_is_asked_only_about_a_patient_without_results_here(
            self, api: Any, system: Any) -> None:
        with_results, without = [(await api.post("Patient", {"resourceType": "Patient", "gender": "male", "name": [
            {"family": "钱", "given": [given]}]})).json()["id"] for given in ("已检", "未检")]
        with_results = f"Patient/{with_results}"
        await lab_result(api, with_results)
        system.state.apps["results-sharing"].state.peers._seen.clear()  # the result's own reference check
        with paths_asked_of_peers(system) as asked:
            assert reasons(await check(api, with_results, POTASSIUM)) == ["recognizable"]
            assert not [path for path in asked if path.startswith("/fhir/Patient")], asked
            answer = await check(api, f"Patient/{without}", POTASSIUM)
            assert value(answer["parameter"], "recognizable") is False and candidates(answer) == []
            assert f"/fhir/Patient/{without}" in asked

    @pytest.mark.parametrize(("params", "status", "code"), [
        ("patient=Patient/no-such-patient&code=http://loinc.org|2823-3", 404, "not-found"),
        ("patient=Patient/pat-0119", 400, "invalid"),
        ("code=http://loinc.org|2823-3", 400, "invalid"),
        ("patient=Patient/pat-0119&code=2823-3&encounter-class=HOME", 400, "invalid"),
        ("patient=Patient/pat-0119&code=2823-3&asOf=yesterday", 400, "invalid"),
        ("patient=Patient/pat-0119&code=2823-3&requester=Organization/nowhere", 422, "processing"),
        (f"patient={NATIONAL_ID}|110101199003070000&code=2823-3", 404, "not-found"),
    ])
    async def test_bad_input_is_an_operation_outcome(self, api: Any, params: str, status: int, code: str) -> None:
        response = await api.get(f"$recognition-check?{params}", organization=TOWNSHIP, level="township")
        assert response.status_code == status, response.text
        assert outcome_code(response) == code


async def _lab_center(api: Any, name: str) -> str:
    org_id = f"lab-{uuid.uuid4().hex[:8]}"
    body = {"resourceType": "Organization", "id": org_id, "name": name,
            "type": [{"coding": [{"system": f"{BASE}/CodeSystem/facility-level", "code": "lab-center"}]}],
            "partOf": {"reference": "Organization/qingxi-county-hospital"}}
    assert (await api.put(f"Organization/{org_id}", body)).status_code == 201
    return f"Organization/{org_id}"


# ------------------------------------------------------------------------------ decisions, statistics

async def checked(api: Any, patient: str, *codes: dict[str, str]) -> None:
    """The township's doctor checks the patient's prior results before ordering, which lets the
    township read what the check returned: a decision may only cite what its author sees."""
    for code in codes:
        await check(api, patient, code)


def decision(patient: str, item: dict[str, str], *, recognized: bool, reason: str | None = None,
             result: str | None = None, authored: str = "2031-03-10T09:00:00+08:00") -> dict[str, Any]:
    task: dict[str, Any] = {
        "resourceType": "Task", "status": "completed", "intent": "order", "authoredOn": authored,
        "code": {"coding": [{"system": TASK_CODE, "code": "recognition-decision"}]},
        "for": {"reference": patient},
        "businessStatus": {"coding": [{"system": f"{BASE}/CodeSystem/recognition-decision-status",
                                       "code": "recognized" if recognized else "not-recognized"}]},
        "input": [{"type": {"coding": [{"system": f"{BASE}/CodeSystem/recognition-decision-input", "code": "item"}]},
                   "valueCoding": item}],
    }
    if reason:
        task["statusReason"] = {"coding": [{"system": f"{BASE}/CodeSystem/non-recognition-reason", "code": reason}]}
    if result:
        task["input"].append({"type": {"coding": [{"system": f"{BASE}/CodeSystem/recognition-decision-input",
                                                   "code": "result"}]}, "valueReference": {"reference": result}})
    return task


class TestDecisionsAndStatistics:
    async def test_a_decision_records_item_version_price_and_producer(self, api: Any, system: Any) -> None:
        patient = "Patient/pat-0121"
        result = await lab_result(api, patient)
        await checked(api, patient, POTASSIUM)
        created = await api.post("Task", decision(patient, POTASSIUM, recognized=True, result=result,
                                                  authored="2031-01-05T10:00:00+08:00"),
                                 organization=TOWNSHIP, level="township")
        assert created.status_code == 201, created.text
        task = created.json()
        assert task["id"].startswith("rs-") and task["requester"]["reference"] == TOWNSHIP
        inputs = {i["type"]["coding"][0]["code"]: next(v for k, v in i.items() if k.startswith("value"))
                  for i in task["input"]}
        assert inputs["item"] == {"system": ITEM, "version": "2026.1", "code": "LAB-K", "display": "血清钾"}
        assert (inputs["category"], inputs["price"]["value"], inputs["producer"]["reference"]) == ("lab", 5.0, LAB)

    @pytest.mark.parametrize(("recognized", "reason", "with_result", "item", "message"), [
        (False, None, False, POTASSIUM, "statusReason"),
        (False, "42", False, POTASSIUM, "statusReason"),
        (True, "01", True, POTASSIUM, "statusReason"),
        (True, None, False, POTASSIUM, "result"),
        (False, "01", False, {"system": LOINC, "code": "2345-7"}, "catalog"),
        (True, None, True, POTASSIUM, "not a shared result"),
    ])
    async def test_bad_decisions_are_refused(self, api: Any, system: Any, recognized: bool, reason: str | None,
                                             with_result: bool, item: dict[str, str], message: str) -> None:
        other_patients_result = await lab_result(api, "Patient/pat-0122") if message == "not a shared result" else None
        result = other_patients_result or (await lab_result(api, "Patient/pat-0123") if with_result else None)
        for patient in ("Patient/pat-0122", "Patient/pat-0123"):
            await checked(api, patient, POTASSIUM)
        response = await api.post("Task", decision("Patient/pat-0123", item, recognized=recognized, reason=reason,
                                                   result=result), organization=TOWNSHIP, level="township")
        assert response.status_code == 422, response.text
        assert message in response.json()["issue"][0]["diagnostics"]

    async def test_statistics_exclude_98_and_99_and_sum_the_money_saved(self, api: Any, system: Any) -> None:
        patient = "Patient/pat-0124"
        potassium = await lab_result(api, patient)
        sodium = await lab_result(api, patient, "2951-2", "钠", value=140)
        ecg = observation(patient, ECG, "11524-6", "心电图")
        bundle, _ = transaction(ecg)
        ecg_result = locations(await upload(api, ECG, bundle))[0]
        await checked(api, patient, POTASSIUM, {"system": LOINC, "code": "2951-2"}, {"system": LOINC, "code": "11524-6"})
        period = "2031-03"
        tasks = [
            decision(patient, POTASSIUM, recognized=True, result=potassium),                    # 5.00 saved
            decision(patient, {"system": ITEM, "code": "LAB-NA"}, recognized=True, result=sodium),  # 5.00
            decision(patient, {"system": ITEM, "code": "ECG-12"}, recognized=True, result=ecg_result),  # 25.00
            decision(patient, POTASSIUM, recognized=False, reason="01", result=potassium),
            decision(patient, {"system": ITEM, "code": "ECG-12"}, recognized=False, reason="04"),
            decision(patient, {"system": ITEM, "code": "IMG-CT-CHEST"}, recognized=False, reason="98"),
            decision(patient, POTASSIUM, recognized=False, reason="99", result=potassium),
            decision(patient, POTASSIUM, recognized=True, result=potassium, authored="2031-04-01T09:00:00+08:00"),
        ]
        for task in tasks:
            response = await api.post("Task", task, organization=TOWNSHIP, level="township")
            assert response.status_code == 201, response.text
        withdrawn = await api.post("Task", {**tasks[0], "status": "entered-in-error"},
                                   organization=TOWNSHIP, level="township")
        assert withdrawn.status_code == 201
        response = await api.get(f"$recognition-statistics?period={period}")
        assert response.status_code == 200, response.text
        figures = response.json()["parameter"]
        assert (value(figures, "decisions"), value(figures, "recognized"), value(figures, "notRecognized"),
                value(figures, "notCounted")) == (7, 3, 2, 2)
        assert Decimal(str(value(figures, "recognitionRate"))) == Decimal("0.6")
        assert value(figures, "moneySaved") == {"value": 35.0, "currency": "CNY"}
        by_producer = {value(p["part"], "key"): p["part"] for p in figures if p["name"] == "byProducer"}
        assert value(by_producer[LAB], "recognized") == 2 and value(by_producer[ECG], "moneySaved")["value"] == 25.0
        by_category = {value(p["part"], "key"): p["part"] for p in figures if p["name"] == "byCategory"}
        assert value(by_category["ecg"], "recognitionRate") == 0.5
        assert value(by_category["imaging"], "recognitionRate") == "n/a"  # only a 98: nothing counted
        by_requester = {value(p["part"], "key"): p["part"] for p in figures if p["name"] == "byRequester"}
        assert value(by_requester[TOWNSHIP], "decisions") == 7

    async def test_an_organization_sees_only_its_own_statistics(self, api: Any) -> None:
        own = await api.get("$recognition-statistics?period=2031-03", organization=TOWNSHIP, level="township")
        assert own.status_code == 200
        assert value(own.json()["parameter"], "organization")["reference"] == TOWNSHIP
        other = await api.get(f"$recognition-statistics?period=2031-03&organization={LAB}",
                              organization=TOWNSHIP, level="township")
        assert other.status_code == 403 and outcome_code(other) == "forbidden"
        assert (await api.get("$recognition-statistics")).status_code == 400


# ------------------------------------------------------------------------------ access (item 5)

COUNTY = "Organization/qingxi-county-hospital"
OTHER_TOWNSHIP = "Organization/thc-baisha"
SHIMEN_HOLDER = "Organization/thc-shimen"


async def read_as(api: Any, organization: str, reference: str, level: str = "township", **headers: str) -> int:
    response = await api.get(reference, organization=organization, level=level, headers=headers or None)
    return response.status_code


async def refer(api: Any, patient: str) -> dict[str, Any]:
    """The township refers the patient up to the county hospital, which accepts."""
    request = {"resourceType": "ServiceRequest", "status": "active", "intent": "order", "priority": "urgent",
               "category": [{"coding": [{"system": f"{BASE}/CodeSystem/referral-category",
                                         "code": "upward-referral"}]}],
               "subject": {"reference": patient}, "requester": {"reference": TOWNSHIP},
               "performer": [{"reference": COUNTY}], "reasonCode": [{"text": "血钾偏高，需进一步诊治"}],
               "requisition": {"system": f"{BASE}/sid/referral-chain", "value": uuid.uuid4().hex}}
    created = await api.post("ServiceRequest", request, organization=TOWNSHIP, level="township")
    assert created.status_code == 201, created.text
    task = {"resourceType": "Task", "status": "requested", "intent": "order", "priority": "urgent",
            "code": {"coding": [{"system": TASK_CODE, "code": "referral"}]},
            "focus": {"reference": f"ServiceRequest/{created.json()['id']}"}, "for": {"reference": patient},
            "requester": {"reference": TOWNSHIP}, "owner": {"reference": COUNTY}}
    submitted = await api.post("Task", task, organization=TOWNSHIP, level="township")
    assert submitted.status_code == 201, submitted.text
    return submitted.json()


class TestAccess:
    async def test_results_are_invisible_without_a_treatment_relationship(self, api: Any) -> None:
        patient = "Patient/pat-0131"
        result = await lab_result(api, patient)
        assert await read_as(api, LAB, result, level="center") == 200  # the producer always reads its own
        assert await read_as(api, OTHER_TOWNSHIP, result) == 404
        found = await api.get("Observation", params={"subject": patient, "_total": "accurate"},
                              organization=OTHER_TOWNSHIP, level="township")
        assert found.json()["total"] == 0

    async def test_a_recognition_check_opens_what_it_returned_for_a_day(self, api: Any) -> None:
        patient = "Patient/pat-0132"
        potassium = await lab_result(api, patient)
        sodium = await lab_result(api, patient, "2951-2", "钠", value=140)
        assert await read_as(api, TOWNSHIP, potassium) == 404
        answer = await check(api, patient, POTASSIUM)
        returned = [value(c["part"], "result")["reference"] for c in answer["parameter"] if c["name"] == "candidate"]
        assert potassium in returned and sodium not in returned
        assert await read_as(api, TOWNSHIP, potassium) == 200
        assert await read_as(api, TOWNSHIP, sodium) == 404  # only what the check returned
        assert await read_as(api, OTHER_TOWNSHIP, potassium) == 404

    async def test_a_repeated_check_keeps_its_grants_and_adds_only_a_new_result(self, api: Any, system: Any) -> None:
        # The check reads the grants it holds in the statement that finds the results: read wrong,
        # a repeat would write every grant again.
        patient = "Patient/pat-0137"
        first = await lab_result(api, patient, effective=ago(days=2))
        await check(api, patient, POTASSIUM)
        granted = await check_grants(system, patient)
        assert [target for target, _ in granted] == [first]
        await check(api, patient, POTASSIUM)  # within the minute: nothing rewritten
        assert await check_grants(system, patient) == granted
        second = await lab_result(api, patient, effective=ago(days=1))
        await check(api, patient, POTASSIUM)
        now_held = await check_grants(system, patient)
        assert now_held[0] == granted[0] and [target for target, _ in now_held] == [first, second]

    async def test_a_check_is_in_the_patients_audit(self, api: Any, system: Any) -> None:
        patient = "Patient/pat-0138"
        await lab_result(api, patient)
        response = await api.get(f"$recognition-check?patient={patient}&code={LOINC}|2823-3", organization=TOWNSHIP,
                                 level="township")
        assert response.status_code == 200, response.text
        await check(api, patient, POTASSIUM)  # over POST: the patient is in the body, not the query
        await system.state.audit.flush()
        audit = await api.get("AuditEvent", params={"patient": patient, "subtype": "operation"},
                              organization=TOWNSHIP, level="township")
        events = [e["resource"] for e in audit.json()["entry"]]
        assert len(events) == 2 and {e["agent"][0]["who"]["reference"] for e in events} == {TOWNSHIP}
        queries = [entity["query"] for e in events for entity in e["entity"] if "query" in entity]
        assert [base64.b64decode(q).decode().split("&")[0] for q in queries] == [f"patient={patient}"]

    async def test_a_created_result_is_in_its_patients_audit(self, api: Any, system: Any) -> None:
        patient = "Patient/pat-0139"
        created = await api.post("Observation", observation(patient, LAB, "2823-3", "钾", value=4.0),
                                 organization=LAB, level="center")
        assert created.status_code == 201, created.text
        result = f"Observation/{created.json()['id']}"
        await system.state.audit.flush()
        audit = await api.get("AuditEvent", params={"patient": patient, "subtype": "create"}, organization=LAB,
                              level="center")
        [event] = [e["resource"] for e in audit.json()["entry"]]
        assert [e["what"]["reference"] for e in event["entity"]] == [result, patient]
        by_result = await api.get("AuditEvent", params={"entity": result}, organization=LAB, level="center")
        assert [e["resource"]["id"] for e in by_result.json()["entry"]] == [event["id"]]

    async def test_naming_another_requester_opens_nothing(self, api: Any) -> None:
        patient = "Patient/pat-0133"
        potassium = await lab_result(api, patient)
        await check(api, patient, POTASSIUM, caller=OTHER_TOWNSHIP, requester=TOWNSHIP)
        assert await read_as(api, OTHER_TOWNSHIP, potassium) == 404
        assert await read_as(api, TOWNSHIP, potassium) == 404

    async def test_an_accepted_referral_opens_the_patients_results_to_the_receiver(self, api: Any) -> None:
        patient = "Patient/pat-0134"
        result = await lab_result(api, patient)
        task = await refer(api, patient)
        assert await read_as(api, COUNTY, result, level="county") == 404  # not before it accepts
        accepted = await api.post(f"Task/{task['id']}/$accept", {"resourceType": "Parameters"},
                                  organization=COUNTY, level="county",
                                  headers={"If-Match": f'W/"{task["meta"]["versionId"]}"'})
        assert accepted.status_code == 200, accepted.text
        seen = await eventually(lambda: api.get(result, organization=COUNTY, level="county"))
        assert seen.status_code == 200
        assert await read_as(api, OTHER_TOWNSHIP, result) == 404

    async def test_break_the_glass_reads_and_is_flagged(self, api: Any, system: Any) -> None:
        patient = "Patient/pat-0135"  # registered at 石门镇 (thc-shimen)
        result = await lab_result(api, patient)
        response = await api.get(result, organization=OTHER_TOWNSHIP, level="township",
                                 scope="system/*.rs alliance/break-glass",
                                 headers={"X-Break-Glass-Reason": "patient unconscious in emergency"})
        assert response.status_code == 200
        await system.state.audit.flush()
        # The emergency read is in the audit, flagged, and the patient's own health center sees it.
        audit = await api.get("AuditEvent", params={"entity": patient, "agent": OTHER_TOWNSHIP},
                              organization=SHIMEN_HOLDER, level="township")
        flagged = [e["resource"] for e in audit.json().get("entry", []) if "purposeOfEvent" in e["resource"]]
        assert flagged and flagged[0]["purposeOfEvent"][0]["coding"][0]["code"] == "BTG", audit.text
        assert flagged[0]["purposeOfEvent"][0]["text"] == "patient unconscious in emergency"


def opt_out(patient: str, status: str = "active") -> dict[str, Any]:
    """The patient refuses the alliance's sharing of their records (全部拒绝共享)."""
    return {"resourceType": "Consent", "status": status,
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                  "code": "patient-privacy"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": patient}, "dateTime": "2026-11-23T09:00:00+08:00",
            "organization": [{"reference": TOWNSHIP}],
            "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                       "code": "OPTOUT"}]},
            "provision": {"type": "deny"}}


class TestOptOut:
    async def test_an_opt_out_closes_every_grant_and_withdrawing_it_reopens_them(self, api: Any) -> None:
        patient = "Patient/pat-0136"
        result = await lab_result(api, patient)
        await check(api, patient, POTASSIUM)
        assert await read_as(api, TOWNSHIP, result) == 200
        consent = await api.post("Consent", opt_out(patient), organization=TOWNSHIP, level="township")
        assert consent.status_code == 201, consent.text
        hidden = await eventually(lambda: api.get(result, organization=TOWNSHIP, level="township"), 404)
        assert hidden.status_code == 404
        assert await read_as(api, LAB, result, level="center") == 200  # the producer keeps its own
        withdrawn = {**consent.json(), "status": "inactive"}
        assert (await api.put(f"Consent/{withdrawn['id']}", withdrawn, organization=TOWNSHIP,
                              level="township")).status_code == 200
        seen = await eventually(lambda: api.get(result, organization=TOWNSHIP, level="township"))
        assert seen.status_code == 200


class TestDemo:
    async def test_the_demo_results_are_recognizable_right_after_loading(self, api: Any, system: Any) -> None:
        from results_sharing.load import DEMO_LAB, load_demo_results
        from servicekit.identity import CallerIdentity

        lab = CallerIdentity("alliance-demo-loader", DEMO_LAB, ("system/*.cruds",), "center")

        async def send(body: bytes) -> tuple[int, bytes]:
            upstream = await system.state.gateway.send("results-sharing", "POST", "/fhir", identity=lab,
                                                       headers={"content-type": "application/fhir+json"}, content=body)
            return upstream.status, upstream.content

        for _ in range(2):  # loading twice updates the same results
            await load_demo_results(send)
        answer = await check(api, "Patient/pat-0011", POTASSIUM)
        assert value(answer["parameter"], "recognizable") is True
        candidates = [c for c in answer["parameter"] if c["name"] == "candidate"]
        assert len(candidates) == 1 and value(candidates[0]["part"], "producer")["reference"] == DEMO_LAB


class TestBundleReferences:
    """A center's transaction names many patients: the directory is asked about them together."""

    async def new_patients(self, api: Any, count: int) -> list[str]:
        created = []
        for index in range(count):
            response = await api.post("Patient", {"resourceType": "Patient", "gender": "female",
                                                  "name": [{"family": "周", "given": [f"批{index}"]}]})
            assert response.status_code == 201, response.text
            created.append(f"Patient/{response.json()['id']}")
        return created

    async def test_the_patients_of_a_transaction_are_asked_for_in_one_search(self, api: Any, system: Any) -> None:
        patients = await self.new_patients(api, 5)  # results-sharing has never seen them
        with paths_asked_of_peers(system) as asked:
            bundle, _ = transaction(*(observation(p, LAB, "2823-3", "钾", value=4.0) for p in patients))
            await upload(api, LAB, bundle)
        patient_requests = [path for path in asked if path.startswith("/fhir/Patient")]
        assert len(patient_requests) == 1 and "_id=" in patient_requests[0], asked

    async def test_a_missing_patient_among_known_ones_is_still_refused(self, api: Any) -> None:
        patients = await self.new_patients(api, 3)
        missing = f"Patient/nobody-{uuid.uuid4().hex[:8]}"
        bundle, _ = transaction(*(observation(p, LAB, "2823-3", "钾", value=4.0) for p in [*patients, missing]))
        response = await upload(api, LAB, bundle, expected=422)
        assert f"refers to {missing}, which does not exist" in response.text
        # Nothing of the transaction was kept.
        for patient in patients:
            found = await api.get(f"Observation?subject={patient}", organization=LAB, level="center")
            assert found.json().get("total") == 0, found.text


def posted(*resources: dict[str, Any]) -> dict[str, Any]:
    """A center's upload as plain creates (POST), as a LIS sends new results: the service writes
    such a run of Observations together (Repository.create_together)."""
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": body,
         "request": {"method": "POST", "url": body["resourceType"]}} for body in resources]}


class TestResultsCreatedTogether:
    """New results posted in one transaction are judged one by one and written together."""

    async def test_each_result_of_a_run_is_stored_marked_found_and_announced_once(
            self, api: Any, system: Any) -> None:
        from sqlalchemy import func, select

        from servicekit.events.tables import outbox

        patient = (await TestBundleReferences().new_patients(api, 1))[0]
        values = [3.9, 4.0, 4.2, 4.4]
        bodies = [observation(patient, LAB, "2823-3", "钾", value=v, effective=ago(days=1, hours=i))
                  for i, v in enumerate(values)]
        written = locations(await upload(api, LAB, posted(*bodies)))
        assert len(written) == 4 and all(w.startswith("Observation/") for w in written)
        for reference, body in zip(written, bodies):
            stored = (await api.get(reference, organization=LAB, level="center")).json()
            assert stored["identifier"] == body["identifier"]
            assert stored["valueQuantity"]["value"] == body["valueQuantity"]["value"]
            assert mark(stored) is not None and mark(stored)["scope"]  # judged as a create alone is
        answer = await check(api, patient, POTASSIUM)
        assert sorted(c["result"]["reference"] for c in candidates(answer)) == sorted(written)
        engine = system.state.apps["results-sharing"].state.database.engine
        async with engine.connect() as conn:
            events = await conn.execute(select(outbox.c.resource_id, func.count()).where(
                outbox.c.resource_id.in_([w.split("/")[1] for w in written])).group_by(outbox.c.resource_id))
            assert sorted(events) == sorted((w.split("/")[1], 1) for w in written)

    async def test_an_identifier_repeated_in_the_run_or_already_stored_is_refused_at_its_entry(
            self, api: Any) -> None:
        patient = (await TestBundleReferences().new_patients(api, 1))[0]
        first = observation(patient, LAB, "2823-3", "钾", value=4.0)
        twin = observation(patient, LAB, "2823-3", "钾", value=4.1, identifier=first["identifier"])
        response = await upload(api, LAB, posted(observation(patient, LAB, "718-7", "血红蛋白", value=130, unit="g/L"),
                                                 first, twin), expected=422)
        diagnostics = response.json()["issue"][0]["diagnostics"]
        assert diagnostics.startswith("Bundle.entry[2] (POST Observation): ") and "already has identifier" in diagnostics
        found = await api.get(f"Observation?subject={patient}", organization=LAB, level="center")
        assert found.json()["total"] == 0, "nothing of the refused run is kept"

        stored = locations(await upload(api, LAB, posted(first)))[0]
        again = observation(patient, LAB, "2823-3", "钾", value=4.2, identifier=first["identifier"])
        response = await upload(api, LAB, posted(observation(patient, LAB, "718-7", "血红蛋白", value=131, unit="g/L"),
                                                 again), expected=422)
        diagnostics = response.json()["issue"][0]["diagnostics"]
        assert diagnostics.startswith("Bundle.entry[1] (POST Observation): ") and stored in diagnostics
        assert "PUT Observation?identifier=" in diagnostics

    async def test_catalog_items_looked_up_at_once_are_those_found_one_by_one(self, system: Any) -> None:
        from fhirkit.store import driver
        from results_sharing import catalog
        from results_sharing.load import DEMO_CATALOG, catalog_code_system

        concepts = catalog_code_system(DEMO_CATALOG)["concept"]
        loincs = [next(p["valueCode"] for p in c["property"] if p["code"] == "loinc") for c in concepts[:5]
                  if any(p["code"] == "loinc" for p in c["property"])]
        wanted = {(ITEM, c["code"]) for c in concepts[:5]} | {(LOINC, code) for code in loincs} | {
            (ITEM, "LAB-NO-SUCH"), (LOINC, "0000-0"), ("http://other.example/codes", "X")}
        database = system.state.apps["results-sharing"].state.database
        async with database.transaction(write=False) as conn:
            one_by_one = {pair: await catalog.find_item(conn, *pair) for pair in wanted}
        catalog.CATALOG.forget()  # what the first transaction kept: the second loads at once
        async with database.transaction(write=False) as conn:
            await catalog.prefetch_items(conn, wanted)
            memo = dict(driver.transaction_memo(conn, catalog.CATALOG.name))
            at_once = {pair: await catalog.find_item(conn, *pair) for pair in wanted}
        assert at_once == one_by_one
        assert sum(item is not None for item in at_once.values()) == 5 + len(loincs)
        assert set(memo) == wanted - {("http://other.example/codes", "X")}  # an unknown system is no catalog's

    async def test_the_gateway_hands_its_parse_of_a_bundle_to_the_service_in_its_process(
            self, api: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        from fhirkit import jsonio

        parses: list[bytes] = []
        original = jsonio.loads

        def counting(raw: bytes | str) -> Any:
            if b'"transaction"' in (raw if isinstance(raw, bytes) else raw.encode()):
                parses.append(raw if isinstance(raw, bytes) else raw.encode())
            return original(raw)

        monkeypatch.setattr(jsonio, "loads", counting)
        assert len(await _post_two_lab_results(api)) == 2
        assert len(parses) == 1, "the gateway parsed the Bundle to route it; the service took that parse"

    async def test_a_transactions_results_are_each_worked_out_once(self, api: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        from results_sharing import results

        worked_out: list[str] = []
        original = results.shared_result

        def counting(body: dict[str, Any]) -> Any:
            worked_out.append(body["code"]["coding"][0]["code"])
            return original(body)

        monkeypatch.setattr(results, "shared_result", counting)
        assert len(await _post_two_lab_results(api)) == 2
        assert sorted(worked_out) == ["2823-3", "718-7"]  # not once per hook (before_creates, before_write, after)

    async def test_a_kept_shared_result_is_let_go_by_the_writes_last_hook(self, system: Any) -> None:
        """A later write of the same dict, changed, must not be judged on what the first one kept."""
        from results_sharing import results

        body = {"resourceType": "Observation", "status": "final", "subject": {"reference": "Patient/p1"},
                "code": {"coding": [{"system": LOINC, "code": "718-7"}]}}
        database = system.state.apps["results-sharing"].state.database
        async with database.transaction(write=False) as conn:
            first = results._shared_result_of(conn, body)
            assert results._shared_result_of(conn, body) is first
            assert results._shared_result_of(conn, {**body}) is not first  # another dict, alike: its own
            assert results._shared_result_of(conn, body, last=True) is first
            body["status"] = "entered-in-error"
            assert results._shared_result_of(conn, body).status == "entered-in-error"


async def _post_two_lab_results(api: Any) -> list[str]:
    """A transaction of two lab results for a new patient, as the lab center; their locations."""
    patient = (await TestBundleReferences().new_patients(api, 1))[0]
    return locations(await upload(api, LAB, posted(observation(patient, LAB, "2823-3", "钾", value=4.0),
                                                   observation(patient, LAB, "718-7", "血红蛋白", value=130,
                                                               unit="g/L"))))

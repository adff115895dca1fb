"""Sterile supply traceability (WS 310) through the gateway: packs, cycles, monitoring,
distribution to township centers, use on patients, the automatic recall on a failed biological
indicator, implant release, `Device/$trace`, bad input and the 3-year retention of records."""

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.support import outcome_code

BASE = "http://county-alliance.org/fhir"
KIND = f"{BASE}/CodeSystem/sterile-device-kind"
MONITORING = f"{BASE}/CodeSystem/sterilization-monitoring"
RESULT = f"{BASE}/CodeSystem/sterilization-result"
PROCEDURE = f"{BASE}/CodeSystem/sterile-supply-procedure"
RULE = f"{BASE}/CodeSystem/sterile-supply-rule"
RECALL_ITEM = f"{BASE}/CodeSystem/recall-item"
TASK_CODE = f"{BASE}/CodeSystem/task-code"
BARCODE = f"{BASE}/sid/sterile-pack-barcode"
LOAD = f"{BASE}/sid/sterilization-load"
STERILIZER_EXT = f"{BASE}/StructureDefinition/sterilizer"
DEMO = Path(__file__).resolve().parents[1] / "services/directory/src/directory/demo/alliance.yaml"

CENTER = "Organization/qingxi-sterile-supply-center"
XIKOU = "Organization/thc-xikou"
SHIMEN = "Organization/thc-shimen"
COUNTY = "Organization/qingxi-county-hospital"
_loaded: set[int] = set()


@dataclass
class Party:
    api: Any
    reference: str
    level: str

    async def call(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        return await self.api.request(method, path, body, organization=self.reference, level=self.level, **kwargs)

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        response = await self.call("POST", body["resourceType"], body)
        assert response.status_code == 201, response.text
        return response.json()


@dataclass
class Parties:
    center: Party
    xikou: Party
    shimen: Party
    county: Party


@pytest.fixture
async def parties(api: Any, system: Any) -> Parties:
    """The demo alliance (loaded once per test session) and its sterile supply parties."""
    if id(system) not in _loaded:
        await _load_demo_alliance(system)
        _loaded.add(id(system))
    return Parties(Party(api, CENTER, "center"), Party(api, XIKOU, "township"), Party(api, SHIMEN, "township"),
                   Party(api, COUNTY, "county"))


async def _load_demo_alliance(system: Any) -> None:
    from directory.directory_file import parse_directory_file
    from directory.load import load_directory
    from servicekit.peers import SYSTEM_IDENTITY

    gateway = system.state.gateway

    async def send(body: bytes) -> tuple[int, bytes]:
        upstream = await gateway.send("directory", "POST", "/fhir", identity=SYSTEM_IDENTITY,
                                      headers={"content-type": "application/fhir+json"}, content=body)
        return upstream.status, upstream.content

    await load_directory(parse_directory_file(DEMO), send)


def _at(days: float) -> str:
    """An instant `days` from now (negative: in the past), as FHIR writes it."""
    return (datetime.now(UTC) + timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sterilizer() -> dict[str, Any]:
    return {"resourceType": "Device", "status": "active",
            "identifier": [{"system": f"{BASE}/sid/sterilizer", "value": f"QX-STEAM-{uuid.uuid4().hex[:6]}"}],
            "type": {"coding": [{"system": KIND, "code": "sterilizer"}]},
            "deviceName": [{"name": "脉动真空压力蒸汽灭菌器", "type": "user-friendly-name"}],
            "owner": {"reference": CENTER}}


def _pack(sterilizer_id: str, load: str, sterilized_days: float, kind: str = "pack",
          expires_days: float = 180) -> dict[str, Any]:
    return {"resourceType": "Device", "status": "active",
            "identifier": [{"system": BARCODE, "value": f"QX{uuid.uuid4().hex[:10].upper()}"}],
            "extension": [{"url": STERILIZER_EXT, "valueReference": {"reference": f"Device/{sterilizer_id}"}}],
            "type": {"coding": [{"system": KIND, "code": kind}]},
            "deviceName": [{"name": "阑尾切除器械包" if kind == "pack" else "骨科接骨板", "type": "user-friendly-name"}],
            "lotNumber": load,
            "manufactureDate": _at(sterilized_days),
            "expirationDate": _at(sterilized_days + expires_days),
            "owner": {"reference": CENTER}}


def _cycle(sterilizer_id: str, load: str, days: float, pack_ids: list[str], status: str = "completed") -> dict:
    return {"resourceType": "Procedure", "status": status,
            "identifier": [{"system": LOAD, "value": load}],
            "code": {"coding": [{"system": PROCEDURE, "code": "sterilization-cycle"}]},
            "contained": [{"resourceType": "Group", "id": "load", "type": "device", "actual": True,
                           "member": [{"entity": {"reference": f"Device/{p}"}} for p in pack_ids]}],
            "subject": {"reference": "#load"},
            "performedPeriod": {"start": _at(days), "end": _at(days + 0.05)},
            "performer": [{"actor": {"reference": f"Device/{sterilizer_id}"}},
                          {"actor": {"reference": CENTER}}]}


def _monitoring(cycle_id: str | None, kind: str, result: str | None, days: float,
                status: str = "final", device: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"resourceType": "Observation", "status": status,
                            "code": {"coding": [{"system": MONITORING, "code": kind}]},
                            "effectiveDateTime": _at(days), "performer": [{"reference": CENTER}]}
    if cycle_id:
        body["focus"] = [{"reference": f"Procedure/{cycle_id}"}]
    if device:
        body["device"] = {"reference": f"Device/{device}"}
    if result:
        body["valueCodeableConcept"] = {"coding": [{"system": RESULT, "code": result}]}
    return body


def _delivery(pack_id: str, receiver: str, days: float) -> dict[str, Any]:
    return {"resourceType": "SupplyDelivery", "status": "completed",
            "suppliedItem": {"quantity": {"value": 1}, "itemReference": {"reference": f"Device/{pack_id}"}},
            "occurrenceDateTime": _at(days), "supplier": {"reference": CENTER}, "receiver": [{"reference": receiver}]}


def _use(pack_id: str, patient: str, site: str, days: float) -> dict[str, Any]:
    return {"resourceType": "Procedure", "status": "completed",
            "code": {"text": "清创缝合术"}, "subject": {"reference": patient},
            "performedDateTime": _at(days), "performer": [{"actor": {"reference": site}}],
            "focalDevice": [{"action": {"text": "使用"}, "manipulated": {"reference": f"Device/{pack_id}"}}]}


async def _packs(center: Party, sterilizer_id: str, load: str, days: float, count: int, kind: str = "pack") -> list:
    return [await center.create(_pack(sterilizer_id, load, days, kind)) for _ in range(count)]


async def _load(center: Party, sterilizer_id: str, load: str, days: float, count: int, kind: str = "pack") -> tuple:
    packs = await _packs(center, sterilizer_id, load, days, count, kind)
    cycle = await center.create(_cycle(sterilizer_id, load, days, [p["id"] for p in packs]))
    return cycle, packs


def _rule(response: Any) -> str:
    issue = response.json()["issue"][0]
    return issue["details"]["coding"][0]["code"]


def _inputs(task: dict[str, Any], item: str) -> set[str]:
    return {i["valueReference"]["reference"] for i in task.get("input", [])
            if i["type"]["coding"][0]["code"] == item}


async def _search(party: Party, query: str) -> list[dict[str, Any]]:
    response = await party.call("GET", query)
    assert response.status_code == 200, response.text
    return [entry["resource"] for entry in response.json().get("entry", []) if entry.get("search", {}).get("mode")
            != "outcome"]


def _barcode(pack: dict[str, Any]) -> str:
    return pack["identifier"][0]["value"]


class TestRecall:
    async def test_failed_biological_indicator_recalls_every_pack_since_the_last_pass(self, parties: Parties) -> None:
        center, xikou, shimen = parties.center, parties.xikou, parties.shimen
        sterilizer = await center.create(_sterilizer())
        s = sterilizer["id"]
        # Cycle 1 passes its BI; its pack was used at 溪口 and must stay out of the recall.
        cycle1, (early,) = await _load(center, s, "L1", -6, 1)
        await center.create(_monitoring(cycle1["id"], "biological-indicator", "pass", -5.5))
        cycle2, (used_xk, used_sm, held_sm, at_center) = await _load(center, s, "L2", -4, 4)
        await center.create(_monitoring(cycle2["id"], "physical", "pass", -4))
        await center.create(_monitoring(cycle2["id"], "chemical", "pass", -4))
        cycle3, (held_xk, unsent) = await _load(center, s, "L3", -2, 2)
        for pack, receiver in ((early, XIKOU), (used_xk, XIKOU), (held_xk, XIKOU), (used_sm, SHIMEN),
                               (held_sm, SHIMEN)):
            await center.create(_delivery(pack["id"], receiver, -1.5))
        await xikou.create(_use(early["id"], "Patient/pat-0001", XIKOU, -1))
        await xikou.create(_use(used_xk["id"], "Patient/pat-0002", XIKOU, -1))
        await shimen.create(_use(used_sm["id"], "Patient/pat-0003", SHIMEN, -1))

        failed = await center.create(_monitoring(cycle3["id"], "biological-indicator", "fail", -0.5))
        assert failed["device"] == {"reference": f"Device/{s}"}  # filled in from the cycle

        issues = await _search(center, f"DetectedIssue?implicated=Observation/{failed['id']}")
        assert len(issues) == 1
        implicated = {i["reference"] for i in issues[0]["implicated"]}
        recalled = {f"Device/{p['id']}" for p in (used_xk, used_sm, held_sm, at_center, held_xk, unsent)}
        assert recalled <= implicated
        assert f"Device/{early['id']}" not in implicated  # sterilized before the last passing BI
        assert {f"Procedure/{cycle2['id']}", f"Procedure/{cycle3['id']}"} <= implicated
        assert f"Procedure/{cycle1['id']}" not in implicated

        tasks = await _search(center, f"Task?code={TASK_CODE}|recall&focus=DetectedIssue/{issues[0]['id']}")
        by_owner = {t["owner"]["reference"]: t for t in tasks}
        assert set(by_owner) == {CENTER, XIKOU, SHIMEN}
        whole = by_owner[CENTER]
        assert _inputs(whole, "withdraw") == {f"Device/{p['id']}" for p in (held_sm, at_center, held_xk, unsent)}
        assert _inputs(whole, "used-pack") == {f"Device/{used_xk['id']}", f"Device/{used_sm['id']}"}
        assert _inputs(whole, "exposed-patient") == {"Patient/pat-0002", "Patient/pat-0003"}

        # Each township center finds its own part of the recall in its queue.
        (xk_task,) = await _search(xikou, f"Task?code={TASK_CODE}|recall&owner={XIKOU}")
        assert xk_task["partOf"] == [{"reference": f"Task/{whole['id']}"}]
        assert _inputs(xk_task, "withdraw") == {f"Device/{held_xk['id']}"}
        assert _inputs(xk_task, "used-pack") == {f"Device/{used_xk['id']}"}
        assert _inputs(xk_task, "exposed-patient") == {"Patient/pat-0002"}
        (sm_task,) = await _search(shimen, f"Task?code={TASK_CODE}|recall&owner={SHIMEN}")
        assert _inputs(sm_task, "withdraw") == {f"Device/{held_sm['id']}"}
        assert _inputs(sm_task, "exposed-patient") == {"Patient/pat-0003"}

        for patient in ("pat-0002", "pat-0003"):
            flags = [f for f in await _search(center, f"Flag?subject=Patient/{patient}")
                     if f["extension"][0]["valueReference"] == {"reference": f"DetectedIssue/{issues[0]['id']}"}]
            assert len(flags) == 1 and flags[0]["status"] == "active"
        assert await _search(center, "Flag?subject=Patient/pat-0001") == []
        # Each health center reads the Flag on the patient it used a recalled pack on, and only that one.
        assert len(await _search(xikou, "Flag?subject=Patient/pat-0002")) == 1
        assert await _search(xikou, "Flag?subject=Patient/pat-0003") == []
        assert len(await _search(shimen, "Flag?subject=Patient/pat-0003")) == 1

        # Recorded again (an amended reading), the failure opens no second recall.
        amended = {**failed, "status": "amended"}
        assert (await center.call("PUT", f"Observation/{failed['id']}", amended)).status_code == 200
        assert len(await _search(center, f"DetectedIssue?implicated=Observation/{failed['id']}")) == 1

        # Recalled packs can be neither used nor distributed any more.
        refused = await shimen.call("POST", "Procedure", _use(held_sm["id"], "Patient/pat-0004", SHIMEN, 0))
        assert refused.status_code == 422 and _rule(refused) == "recalled", refused.text
        refused = await center.call("POST", "SupplyDelivery", _delivery(at_center["id"], XIKOU, 0))
        assert refused.status_code == 422 and _rule(refused) == "recalled", refused.text

    async def test_trace_answers_load_monitoring_deliveries_uses_and_recall(self, parties: Parties) -> None:
        center, xikou = parties.center, parties.xikou
        s = (await center.create(_sterilizer()))["id"]
        cycle, (pack, other) = await _load(center, s, "T1", -3, 2)
        physical = await center.create(_monitoring(cycle["id"], "physical", "pass", -3))
        delivery = await center.create(_delivery(pack["id"], XIKOU, -2))
        use = await xikou.create(_use(pack["id"], "Patient/pat-0005", XIKOU, -1))

        response = await center.call("GET", f"Device/$trace?identifier={_barcode(pack)}")
        assert response.status_code == 200, response.text
        parameters = response.json()["parameter"]
        named = {p["name"]: p for p in parameters}
        assert named["pack"]["resource"]["id"] == pack["id"]
        assert named["released"]["valueBoolean"] is True
        load = {p["name"]: p for p in named["load"]["part"]}
        assert load["cycle"]["resource"]["id"] == cycle["id"]
        assert load["load-number"]["valueString"] == "T1"
        assert load["sterilizer"]["valueReference"] == {"reference": f"Device/{s}"}
        assert [p["resource"]["id"] for p in parameters if p["name"] == "monitoring"] == [physical["id"]]
        assert [p["resource"]["id"] for p in parameters if p["name"] == "delivery"] == [delivery["id"]]
        (used,) = [p for p in parameters if p["name"] == "use"]
        used_parts = {p["name"]: p for p in used["part"]}
        assert used_parts["procedure"]["resource"]["id"] == use["id"]
        assert used_parts["patient"]["valueReference"] == {"reference": "Patient/pat-0005"}
        assert used_parts["organization"]["valueReference"] == {"reference": XIKOU}
        assert "recall" not in named

        await center.create(_monitoring(cycle["id"], "biological-indicator", "fail", -0.2))
        traced = (await center.call("GET", f"Device/$trace?identifier={BARCODE}|{_barcode(other)}")).json()
        named = {p["name"]: p for p in traced["parameter"]}
        assert named["released"]["valueBoolean"] is False
        assert named["hold"]["valueCoding"]["code"] == "load-failed"
        assert named["recall"]["valueReference"]["reference"].startswith("DetectedIssue/")

    async def test_unknown_barcode_is_404(self, parties: Parties) -> None:
        response = await parties.center.call("GET", "Device/$trace?identifier=QX-NO-SUCH-PACK")
        assert response.status_code == 404
        assert outcome_code(response) == "not-found"
        assert "QX-NO-SUCH-PACK" in response.json()["issue"][0]["diagnostics"]


class TestRelease:
    async def test_an_implant_is_released_only_after_its_biological_indicator_passes(self, parties: Parties) -> None:
        center, county = parties.center, parties.county
        s = (await center.create(_sterilizer()))["id"]
        cycle, (implant,) = await _load(center, s, "IMP1", -1, 1, kind="implant")
        await center.create(_monitoring(cycle["id"], "physical", "pass", -1))
        await center.create(_monitoring(cycle["id"], "biological-indicator", None, -0.9, status="preliminary"))

        refused = await center.call("POST", "SupplyDelivery", _delivery(implant["id"], XIKOU, 0))
        assert refused.status_code == 422, refused.text
        assert outcome_code(refused) == "business-rule" and _rule(refused) == "implant-release"
        assert "implant-release" in refused.json()["issue"][0]["diagnostics"]
        refused = await county.call("POST", "Procedure", _use(implant["id"], "Patient/pat-0006", COUNTY, 0))
        assert refused.status_code == 422 and _rule(refused) == "implant-release", refused.text

        await center.create(_monitoring(cycle["id"], "biological-indicator", "pass", -0.1))
        await center.create(_delivery(implant["id"], COUNTY, 0))
        await county.create(_use(implant["id"], "Patient/pat-0006", COUNTY, 0))
        # A pack opened once is not used again on another patient.
        again = await county.call("POST", "Procedure", _use(implant["id"], "Patient/pat-0007", COUNTY, 0))
        assert again.status_code == 422 and _rule(again) == "single-use", again.text

    async def test_a_pack_in_no_completed_cycle_or_past_expiry_is_not_released(self, parties: Parties) -> None:
        center = parties.center
        s = (await center.create(_sterilizer()))["id"]
        (loose,) = await _packs(center, s, "N1", -1, 1)
        refused = await center.call("POST", "SupplyDelivery", _delivery(loose["id"], XIKOU, 0))
        assert refused.status_code == 422 and _rule(refused) == "not-sterilized", refused.text
        expired = await center.create(_pack(s, "N2", -20, expires_days=14))
        await center.create(_cycle(s, "N2", -20, [expired["id"]]))
        refused = await center.call("POST", "SupplyDelivery", _delivery(expired["id"], XIKOU, 0))
        assert refused.status_code == 422 and _rule(refused) == "expired", refused.text


class TestBadInput:
    async def test_a_cycle_on_an_unknown_sterilizer_is_rejected_with_its_whole_transaction(self, parties) -> None:
        center = parties.center
        s = (await center.create(_sterilizer()))["id"]
        pack = _pack(s, "B1", -1)
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": "urn:uuid:8d0e4a8e-0000-4000-8000-000000000001", "resource": pack,
             "request": {"method": "POST", "url": "Device"}},
            {"resource": {**_cycle("no-such-sterilizer", "B1", -1, []), "contained": [
                {"resourceType": "Group", "id": "load", "type": "device", "actual": True,
                 "member": [{"entity": {"reference": "urn:uuid:8d0e4a8e-0000-4000-8000-000000000001"}}]}]},
             "request": {"method": "POST", "url": "Procedure"}},
        ]}
        response = await center.call("POST", "", bundle)
        assert response.status_code == 422, response.text
        assert "no-such-sterilizer" in response.json()["issue"][0]["diagnostics"]
        assert await _search(center, f"Device?identifier={BARCODE}|{_barcode(pack)}") == []

    async def test_a_cycle_whose_pack_is_labelled_for_another_load_is_rejected(self, parties: Parties) -> None:
        center = parties.center
        s = (await center.create(_sterilizer()))["id"]
        (pack,) = await _packs(center, s, "C1", -1, 1)
        response = await center.call("POST", "Procedure", _cycle(s, "C2", -1, [pack["id"]]))
        assert response.status_code == 422, response.text
        assert "C1" in response.json()["issue"][0]["diagnostics"]
        missing_load = {**_cycle(s, "C3", -1, []), "subject": {"reference": "Patient/pat-0001"}}
        response = await center.call("POST", "Procedure", missing_load)
        assert response.status_code == 422 and "contained Group" in response.text

    async def test_a_pack_without_its_label_and_a_duplicate_barcode_are_refused(self, parties: Parties) -> None:
        center = parties.center
        s = (await center.create(_sterilizer()))["id"]
        unlabelled = {k: v for k, v in _pack(s, "D1", -1).items() if k != "lotNumber"}
        response = await center.call("POST", "Device", unlabelled)
        assert response.status_code == 422 and "lotNumber" in response.text
        first = await center.create(_pack(s, "D1", -1))
        duplicate = {**_pack(s, "D1", -1), "identifier": first["identifier"]}
        response = await center.call("POST", "Device", duplicate)
        assert response.status_code == 409 and outcome_code(response) == "duplicate"

    async def test_a_monitoring_result_needs_its_cycle_and_a_verdict(self, parties: Parties) -> None:
        center = parties.center
        s = (await center.create(_sterilizer()))["id"]
        cycle, _ = await _load(center, s, "M1", -1, 1)
        no_cycle = await center.call("POST", "Observation", _monitoring(None, "biological-indicator", "pass", 0))
        assert no_cycle.status_code == 422 and "focus" in no_cycle.text
        no_verdict = await center.call("POST", "Observation", _monitoring(cycle["id"], "chemical", None, 0))
        assert no_verdict.status_code == 422 and "pass or fail" in no_verdict.text
        other = (await center.create(_sterilizer()))["id"]
        wrong = await center.call("POST", "Observation", _monitoring(cycle["id"], "physical", "pass", 0, device=other))
        assert wrong.status_code == 422 and "cycle's sterilizer" in wrong.text
        # A daily Bowie-Dick test stands on its own, on the sterilizer.
        await center.create(_monitoring(None, "bowie-dick", "pass", 0, device=s))


class TestRetention:
    async def test_a_monitoring_record_younger_than_three_years_cannot_be_deleted(self, parties: Parties) -> None:
        center = parties.center
        s = (await center.create(_sterilizer()))["id"]
        cycle, _ = await _load(center, s, "R1", -30, 1)
        recent = await center.create(_monitoring(cycle["id"], "physical", "pass", -30))
        refused = await center.call("DELETE", f"Observation/{recent['id']}")
        assert refused.status_code == 422, refused.text
        assert _rule(refused) == "retention"
        assert (await center.call("GET", f"Observation/{recent['id']}")).status_code == 200
        refused = await center.call("DELETE", f"Procedure/{cycle['id']}")
        assert refused.status_code == 422 and _rule(refused) == "retention"

        old_cycle, _ = await _load(center, s, "R0", -4 * 366, 1)
        old = await center.create(_monitoring(old_cycle["id"], "physical", "pass", -4 * 366))
        assert (await center.call("DELETE", f"Observation/{old['id']}")).status_code in (200, 204)


async def test_the_sterile_supply_code_systems_are_served(parties: Parties) -> None:
    response = await parties.xikou.call("GET", "CodeSystem/sterilization-monitoring")
    assert response.status_code == 200, response.text
    codes = {c["code"] for c in response.json()["concept"]}
    assert codes == {"physical", "chemical", "bowie-dick", "biological-indicator"}
    rules = await parties.xikou.call("GET", f"CodeSystem?url={RULE}")
    assert {c["code"] for c in rules.json()["entry"][0]["resource"]["concept"]} >= {"implant-release", "retention"}

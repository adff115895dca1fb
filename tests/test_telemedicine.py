"""Telemedicine through the gateway: the invitation and its consent, the shared workflow engine
(accept, decline, assign, forward, complete with a signed report), scheduling with the
one-booking-per-slot guarantee, deadlines, the worklist, statistics and conversion to a referral."""

import asyncio
import dataclasses
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support import create_organization, local_day, outcome_code

BASE = "http://county-alliance.org/fhir"
LEVEL = f"{BASE}/CodeSystem/facility-level"
CATEGORY = f"{BASE}/CodeSystem/telemedicine-category"
TASK_CODE = f"{BASE}/CodeSystem/task-code"
TITLE = f"{BASE}/CodeSystem/professional-title"
SPECIALTY = f"{BASE}/CodeSystem/specialty"
VIRTUAL = "http://hl7.org/fhir/5.0/StructureDefinition/extension-Appointment.virtualService"


@dataclass
class Party:
    api: Any
    reference: str
    level: str

    async def call(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        return await self.api.request(method, path, body, organization=self.reference, level=self.level, **kwargs)


@dataclass
class Alliance:
    province: Party
    county: Party
    ecg_center: Party
    township: Party
    other_township: Party
    patient: str
    ecg_reader: str  # PractitionerRole: attending physician, ECG diagnosis, at the ECG center
    ecg_junior: str  # PractitionerRole: resident physician at the ECG center
    cardiologist: str  # PractitionerRole: chief physician, cardiology, at the provincial hospital


async def _practitioner_role(api: Any, organization: str, title: str, specialty: str) -> str:
    person = await api.post("Practitioner", {
        "resourceType": "Practitioner", "name": [{"family": "王", "given": ["医生"]}],
        "qualification": [{"code": {"coding": [{"system": TITLE, "code": title}]}}]})
    assert person.status_code == 201, person.text
    role = await api.post("PractitionerRole", {
        "resourceType": "PractitionerRole", "active": True,
        "practitioner": {"reference": f"Practitioner/{person.json()['id']}"},
        "organization": {"reference": organization},
        "specialty": [{"coding": [{"system": SPECIALTY, "code": specialty}]}]})
    assert role.status_code == 201, role.text
    return f"PractitionerRole/{role.json()['id']}"


@pytest.fixture
async def alliance(api: Any) -> Alliance:
    return await new_alliance(api)


async def new_alliance(api: Any) -> Alliance:
    """A fresh alliance (fresh organization ids and patient), so tests never see each other's."""
    province = await create_organization(api, "provincial-hospital", None, "省人民医院", id_prefix="tm")
    city = await create_organization(api, "city-hospital", province, "市中心医院", id_prefix="tm")
    county = await create_organization(api, "county-hospital", city, "县人民医院", id_prefix="tm")
    ecg_center = await create_organization(api, "ecg-center", county, "县心电诊断中心", id_prefix="tm")
    township = await create_organization(api, "township-health-center", county, "溪口镇中心卫生院", id_prefix="tm")
    other = await create_organization(api, "township-health-center", county, "石门镇卫生院", id_prefix="tm")
    patient = await api.post("Patient", {"resourceType": "Patient", "name": [{"family": "陈", "given": ["桂英"]}],
                                         "gender": "female", "birthDate": "1952-03-08"})
    return Alliance(
        province=Party(api, province, "provincial"), county=Party(api, county, "county"),
        ecg_center=Party(api, ecg_center, "center"), township=Party(api, township, "township"),
        other_township=Party(api, other, "township"), patient=f"Patient/{patient.json()['id']}",
        ecg_reader=await _practitioner_role(api, ecg_center, "attending-physician", "ecg-diagnosis"),
        ecg_junior=await _practitioner_role(api, ecg_center, "resident-physician", "ecg-diagnosis"),
        cardiologist=await _practitioner_role(api, province, "chief-physician", "cardiology"),
    )


async def consent(alliance: Alliance, status: str = "active", **changes: Any) -> str:
    body = {
        "resourceType": "Consent", "status": status,
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "treatment"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": alliance.patient}, "dateTime": "2026-11-20T09:00:00+08:00",
        "organization": [{"reference": alliance.township.reference}],
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
        "provision": {"type": "permit", "period": {"start": "2020-01-01", "end": "2099-12-31"}},
        **changes,
    }
    response = await alliance.township.call("POST", "Consent", body)
    assert response.status_code == 201, response.text
    return f"Consent/{response.json()['id']}"


async def record_summary(alliance: Alliance) -> str:
    response = await alliance.township.call("POST", "DocumentReference", {
        "resourceType": "DocumentReference", "status": "current", "type": {"text": "病历摘要"},
        "subject": {"reference": alliance.patient},
        "content": [{"attachment": {"contentType": "text/plain", "data": "6IO46Ze35LiA5ZGo"}}]})
    assert response.status_code == 201, response.text
    return f"DocumentReference/{response.json()['id']}"


async def ecg_observation(alliance: Alliance) -> str:
    response = await alliance.township.call("POST", "Observation", {
        "resourceType": "Observation", "status": "final",
        "identifier": [{"system": f"{BASE}/sid/ecg", "value": uuid.uuid4().hex}],
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": "procedure"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "11524-6", "display": "EKG study"}]},
        "subject": {"reference": alliance.patient}, "effectiveDateTime": "2026-11-23T08:30:00+08:00",
        "performer": [{"reference": alliance.township.reference}],
        "valueString": "窦性心律，V1-V4 ST段抬高"})
    assert response.status_code == 201, response.text
    return f"Observation/{response.json()['id']}"


def invitation(alliance: Alliance, category: str, invited: Party, supporting: list[str], **changes: Any) -> dict:
    body: dict[str, Any] = {
        "resourceType": "ServiceRequest", "status": "active", "intent": "order",
        "category": [{"coding": [{"system": CATEGORY, "code": category}]}],
        "code": {"text": "明确胸痛病因并给出诊疗意见"},
        "priority": "urgent",
        "subject": {"reference": alliance.patient},
        "requester": {"reference": alliance.township.reference},
        "performer": [{"reference": invited.reference}],
        "reasonCode": [{"text": "反复胸闷一周，心电图ST段改变"}],
        "occurrenceDateTime": "2026-11-23T10:00:00+08:00",
        "performerType": {"coding": [{"system": SPECIALTY,
                                      "code": "ecg-diagnosis" if category == "remote-ecg" else "cardiology"}]},
        "orderDetail": [{"coding": [{"system": TITLE, "code": "attending-physician"}]}],
        "supportingInfo": [{"reference": r} for r in supporting],
        "requisition": {"system": f"{BASE}/sid/telemedicine-chain", "value": uuid.uuid4().hex},
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def tracking_task(request: dict, alliance: Alliance, invited: Party, code: str) -> dict:
    return {"resourceType": "Task", "status": "requested", "intent": "order", "priority": request["priority"],
            "code": {"coding": [{"system": TASK_CODE, "code": code}]},
            "focus": {"reference": f"ServiceRequest/{request['id']}"}, "for": {"reference": alliance.patient},
            "requester": {"reference": alliance.township.reference}, "owner": {"reference": invited.reference}}


async def invite(alliance: Alliance, category: str, invited: Party, **changes: Any) -> tuple[dict, dict, list[str]]:
    supporting = [await consent(alliance), await record_summary(alliance)]
    if category == "remote-ecg":
        supporting.append(await ecg_observation(alliance))
    request = await alliance.township.call("POST", "ServiceRequest",
                                           invitation(alliance, category, invited, supporting, **changes))
    assert request.status_code == 201, request.text
    code = "teleconsultation" if category == "teleconsultation" else "remote-diagnosis"
    task = await alliance.township.call("POST", "Task", tracking_task(request.json(), alliance, invited, code))
    assert task.status_code == 201, task.text
    return request.json(), task.json(), supporting


def etag(resource: dict) -> dict[str, str]:
    return {"If-Match": f'W/"{resource["meta"]["versionId"]}"'}


def parameters(**values: Any) -> dict:
    parts = []
    for name, value in values.items():
        key = "valueReference" if isinstance(value, str) and "/" in value and " " not in value else "valueString"
        parts.append({"name": name, key: {"reference": value} if key == "valueReference" else value})
    return {"resourceType": "Parameters", "parameter": parts}


async def operate(party: Party, task: dict, operation: str, body: dict | None = None) -> Any:
    return await party.call("POST", f"Task/{task['id']}/${operation}", body or {"resourceType": "Parameters"},
                            headers=etag(task))


async def signed_report(reader: Party, alliance: Alliance, practitioner: str, kind: str = "DiagnosticReport",
                        results: list[str] | None = None, sign: bool = True) -> str:
    if kind == "DiagnosticReport":
        body: dict[str, Any] = {
            "resourceType": "DiagnosticReport", "status": "final",
            "identifier": [{"system": f"{BASE}/sid/report", "value": uuid.uuid4().hex}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "11524-6"}]},
            "subject": {"reference": alliance.patient}, "effectiveDateTime": "2026-11-23T08:40:00+08:00",
            "issued": "2026-11-23T08:45:00+08:00",
            "performer": [{"reference": reader.reference}, {"reference": practitioner}],
            "result": [{"reference": r} for r in results or []],
            "conclusion": "急性前壁ST段抬高型心肌梗死可能，建议立即转上级医院",
        }
    else:
        body = {"resourceType": "DocumentReference", "status": "current",
                "type": {"coding": [{"system": "http://loinc.org", "code": "11488-4", "display": "Consult note"}]},
                "subject": {"reference": alliance.patient}, "author": [{"reference": practitioner}],
                "content": [{"attachment": {"contentType": "text/plain", "data": "5bu66K6u5p2l6Zmi"}}]}
    report = await reader.call("POST", kind, body)
    assert report.status_code == 201, report.text
    reference = f"{kind}/{report.json()['id']}"
    if sign:
        provenance = await reader.call("POST", "Provenance", {
            "resourceType": "Provenance", "target": [{"reference": reference}],
            "recorded": "2026-11-23T08:46:00+08:00",
            "agent": [{"who": {"reference": practitioner}}],
            "signature": [{"type": [{"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.1"}],
                           "when": "2026-11-23T08:46:00+08:00", "who": {"reference": practitioner},
                           "sigFormat": "application/jose", "data": "ZXlKaGJHY2lPaUpGVXpJMU5pSjk="}]})
        assert provenance.status_code == 201, provenance.text
    return reference


def diagnostics(response: Any) -> str:
    return response.json()["issue"][0]["diagnostics"]


class TestInvitation:
    async def test_missing_content_is_422_naming_each_piece(self, alliance: Alliance) -> None:
        body = invitation(alliance, "remote-ecg", alliance.ecg_center, [], reasonCode=None, code=None,
                          occurrenceDateTime=None, performerType=None, orderDetail=None)
        response = await alliance.township.call("POST", "ServiceRequest", body)
        assert response.status_code == 422
        assert outcome_code(response) == "business-rule"
        message = diagnostics(response)
        for piece in ("reason", "purpose", "proposed time", "record summary", "specialty wanted", "title wanted",
                      "consent", "what is to be read"):
            assert piece in message, piece

    async def test_missing_or_inactive_consent_is_422(self, alliance: Alliance) -> None:
        summary, reading = await record_summary(alliance), await ecg_observation(alliance)
        without = invitation(alliance, "remote-ecg", alliance.ecg_center, [summary, reading])
        response = await alliance.township.call("POST", "ServiceRequest", without)
        assert response.status_code == 422 and "consent" in diagnostics(response)
        for bad in (await consent(alliance, status="draft"),
                    await consent(alliance, provision={"type": "permit", "period": {"end": "2021-01-01"}}),
                    await consent(alliance, organization=[{"reference": alliance.other_township.reference}])):
            refused = await alliance.township.call(
                "POST", "ServiceRequest", invitation(alliance, "remote-ecg", alliance.ecg_center, [bad, summary, reading]))
            assert refused.status_code == 422, refused.text
            assert bad in diagnostics(refused)
        unknown = await alliance.township.call("POST", "ServiceRequest", invitation(
            alliance, "remote-ecg", alliance.ecg_center, ["Consent/does-not-exist", summary, reading]))
        assert unknown.status_code == 422

    async def test_invitations_go_up_inside_the_alliance(self, alliance: Alliance) -> None:
        supporting = [await consent(alliance), await record_summary(alliance)]
        sideways_down = invitation(alliance, "teleconsultation", alliance.township, supporting)
        response = await alliance.township.call("POST", "ServiceRequest", sideways_down)
        assert response.status_code == 422 and "invite itself" in diagnostics(response)

    async def test_the_task_must_match_its_request(self, alliance: Alliance) -> None:
        request, _, _ = await invite(alliance, "teleconsultation", alliance.county)
        wrong_code = tracking_task(request, alliance, alliance.county, "remote-diagnosis")
        response = await alliance.township.call("POST", "Task", wrong_code)
        assert response.status_code == 422 and "teleconsultation" in diagnostics(response)
        wrong_owner = tracking_task(request, alliance, alliance.province, "teleconsultation")
        assert (await alliance.township.call("POST", "Task", wrong_owner)).status_code == 422


class TestOptOut:
    async def test_a_patient_who_opted_out_of_sharing_cannot_be_sent_for_teleconsultation(
        self, alliance: Alliance
    ) -> None:
        created = await alliance.township.call("POST", "Patient", {"resourceType": "Patient", "name": [{"family": "郑"}]})
        mine = dataclasses.replace(alliance, patient=f"Patient/{created.json()['id']}")
        supporting = [await consent(mine), await record_summary(mine)]
        allowed = await mine.township.call("POST", "ServiceRequest", invitation(mine, "teleconsultation", mine.county,
                                                                                 supporting))
        assert allowed.status_code == 201, allowed.text
        denial = await consent(mine, policyRule={"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                                             "code": "OPTOUT"}]}, provision={"type": "deny"})
        refused = await mine.township.call("POST", "ServiceRequest", invitation(mine, "teleconsultation", mine.county,
                                                                                supporting))
        assert refused.status_code == 422  # at once: the platform is asked, not a copy
        assert denial in diagnostics(refused) and "opted out" in diagnostics(refused)


class TestWorkflow:
    async def test_refusals_wrong_actor_wrong_state_missing_reason_stale_version(self, alliance: Alliance) -> None:
        _, task, _ = await invite(alliance, "teleconsultation", alliance.county)
        by_requester = await operate(alliance.township, task, "accept")
        assert by_requester.status_code == 403 and outcome_code(by_requester) == "forbidden"
        wrong_state = await operate(alliance.county, task, "start")
        assert wrong_state.status_code == 422
        assert "$accept" in diagnostics(wrong_state) and "$reject" in diagnostics(wrong_state)
        no_reason = await operate(alliance.county, task, "reject")
        assert no_reason.status_code == 422
        assert no_reason.json()["issue"][0]["expression"] == ["Task.statusReason"]
        received = (await operate(alliance.county, task, "receive")).json()
        stale = await operate(alliance.county, task, "accept")
        assert stale.status_code == 412
        missing = await alliance.county.call("POST", f"Task/{received['id']}/$accept", {"resourceType": "Parameters"})
        assert missing.status_code == 428
        by_invited = await operate(alliance.county, received, "cancel", parameters(reason="不需要了"))
        assert by_invited.status_code == 403

    async def test_decline_with_reason_and_provenance_and_available_actions(self, alliance: Alliance) -> None:
        _, task, _ = await invite(alliance, "teleconsultation", alliance.county)
        actions = await alliance.county.call("GET", f"Task/{task['id']}/$available-actions")
        offered = {p["part"][0]["valueCode"] for p in actions.json()["parameter"] if p["name"] == "action"}
        assert offered == {"receive", "accept", "reject"}
        declined = await operate(alliance.county, task, "reject", parameters(reason="本院无心内科专家排班"))
        assert declined.status_code == 200, declined.text
        assert declined.json()["statusReason"]["text"] == "本院无心内科专家排班"
        seen = (await alliance.township.call("GET", f"Task/{task['id']}")).json()
        assert seen["status"] == "rejected"
        provenance = await alliance.township.call("GET", "Provenance", params={"target": f"Task/{task['id']}"})
        assert [e["resource"]["activity"]["coding"][0]["code"] for e in provenance.json()["entry"]] == ["reject"]

    async def test_assigning_checks_title_specialty_and_workplace(self, alliance: Alliance) -> None:
        _, task, _ = await invite(alliance, "remote-ecg", alliance.ecg_center)
        junior = await operate(alliance.ecg_center, task, "assign-practitioner", parameters(practitioner=alliance.ecg_junior))
        assert junior.status_code == 422 and "attending-physician" in diagnostics(junior)
        elsewhere = await operate(alliance.ecg_center, task, "assign-practitioner",
                                  parameters(practitioner=alliance.cardiologist))
        assert elsewhere.status_code == 422 and "does not work at" in diagnostics(elsewhere)
        by_requester = await operate(alliance.township, task, "assign-practitioner",
                                     parameters(practitioner=alliance.ecg_reader))
        assert by_requester.status_code == 403
        assigned = await operate(alliance.ecg_center, task, "assign-practitioner",
                                 parameters(practitioner=alliance.ecg_reader))
        assert assigned.status_code == 200, assigned.text
        request = (await alliance.township.call("GET", task["focus"]["reference"])).json()
        assert {"reference": alliance.ecg_reader} in request["performer"]


class TestRemoteEcg:
    async def test_a_full_remote_ecg_read_within_its_deadline(self, alliance: Alliance) -> None:
        _, task, supporting = await invite(alliance, "remote-ecg", alliance.ecg_center)
        reading = supporting[-1]
        from fhirkit.search.values import date_range

        window = date_range(task["restriction"]["period"]["end"])[0] - date_range(task["authoredOn"])[0]
        assert 29 * 60_000_000 <= window <= 31 * 60_000_000  # remote ECG: 30 minutes by default
        worklist = await alliance.ecg_center.call("GET", "Task", params={
            "owner": alliance.ecg_center.reference, "code": "remote-diagnosis", "status": "requested",
            "_sort": "-priority,authored-on"})
        assert task["id"] in [e["resource"]["id"] for e in worklist.json()["entry"]]
        accepted = (await operate(alliance.ecg_center, task, "accept")).json()
        assigned = (await operate(alliance.ecg_center, accepted, "assign-practitioner",
                                  parameters(practitioner=alliance.ecg_reader))).json()

        no_report = await operate(alliance.ecg_center, assigned, "complete")
        assert no_report.status_code == 422
        unsigned = await signed_report(alliance.ecg_center, alliance, alliance.ecg_reader, results=[reading], sign=False)
        refused = await operate(alliance.ecg_center, assigned, "complete", parameters(output=unsigned))
        assert refused.status_code == 422 and "signature" in diagnostics(refused)
        unlinked = await signed_report(alliance.ecg_center, alliance, alliance.ecg_reader, results=[])
        refused = await operate(alliance.ecg_center, assigned, "complete", parameters(output=unlinked))
        assert refused.status_code == 422 and "Observation" in diagnostics(refused)

        report = await signed_report(alliance.ecg_center, alliance, alliance.ecg_reader, results=[reading])
        done = await operate(alliance.ecg_center, assigned, "complete", parameters(output=report))
        assert done.status_code == 200, done.text
        assert done.json()["status"] == "completed"
        seen = (await alliance.township.call("GET", f"Task/{task['id']}")).json()
        assert seen["output"][-1]["valueReference"]["reference"] == report
        assert (await alliance.township.call("GET", report)).status_code == 200

        statistics = await alliance.county.call("GET", "$telemedicine-statistics", params={
            "period": local_day(task["authoredOn"]), "organization": alliance.ecg_center.reference})
        assert statistics.status_code == 200, statistics.text
        figures = {p["name"]: p for p in statistics.json()["parameter"]}
        assert figures["remoteEcg"]["valueInteger"] == 1
        assert figures["completed"]["valueInteger"] == 1
        assert figures["completedOnTime"]["valueInteger"] == 1
        assert figures["deadlineCompliance"]["valueDecimal"] == 1.0
        other = await alliance.township.call("GET", "$telemedicine-statistics", params={
            "period": local_day(task["authoredOn"]), "organization": alliance.ecg_center.reference})
        assert other.status_code == 403


class TestForwarding:
    async def test_county_forwards_to_the_province_which_answers_and_the_township_sees_each_hop(
            self, alliance: Alliance) -> None:
        _, task, _ = await invite(alliance, "teleconsultation", alliance.county)
        no_reason = await operate(alliance.county, task, "forward", parameters(owner=alliance.province.reference))
        assert no_reason.status_code == 422
        downward = await operate(alliance.county, task, "forward",
                                 parameters(owner=alliance.ecg_center.reference, reason="转心电中心"))
        assert downward.status_code == 422
        by_requester = await operate(alliance.township, task, "forward",
                                     parameters(owner=alliance.province.reference, reason="x"))
        assert by_requester.status_code == 403
        forwarded = await operate(alliance.county, task, "forward",
                                  parameters(owner=alliance.province.reference, reason="需省级心内科专家会诊"))
        assert forwarded.status_code == 201, forwarded.text
        hop = forwarded.json()
        assert hop["owner"]["reference"] == alliance.province.reference
        assert hop["requester"]["reference"] == alliance.township.reference

        original = (await alliance.township.call("GET", f"Task/{task['id']}")).json()
        assert original["status"] == "rejected"
        assert original["businessStatus"]["coding"][0]["code"] == "forwarded"
        chain = await alliance.township.call("GET", "Task", params={"based-on": f"Task/{task['id']}"})
        assert [e["resource"]["id"] for e in chain.json()["entry"]] == [hop["id"]]

        accepted = (await operate(alliance.province, hop, "accept")).json()
        assigned = (await operate(alliance.province, accepted, "assign-practitioner",
                                  parameters(practitioner=alliance.cardiologist))).json()
        started = (await operate(alliance.province, assigned, "start")).json()
        note = await signed_report(alliance.province, alliance, alliance.cardiologist, kind="DocumentReference")
        done = await operate(alliance.province, started, "complete", parameters(output=note))
        assert done.status_code == 200, done.text
        answered = (await alliance.township.call("GET", f"Task/{hop['id']}")).json()
        assert answered["status"] == "completed"
        assert answered["output"][-1]["valueReference"]["reference"] == note


def slot_body(schedule: str, start: str, end: str) -> dict:
    return {"resourceType": "Slot", "schedule": {"reference": schedule}, "status": "free", "start": start, "end": end,
            "specialty": [{"coding": [{"system": SPECIALTY, "code": "cardiology"}]}]}


def appointment(alliance: Alliance, request: dict, slot: str, invited: Party, practitioner: str) -> dict:
    return {
        "resourceType": "Appointment", "status": "booked",
        "basedOn": [{"reference": f"ServiceRequest/{request['id']}"}],
        "slot": [{"reference": slot}],
        "participant": [
            {"actor": {"reference": alliance.township.reference}, "status": "accepted"},
            {"actor": {"reference": invited.reference}, "status": "accepted"},
            {"actor": {"reference": practitioner}, "status": "accepted"},
            {"actor": {"reference": alliance.patient}, "status": "accepted"}],
        "extension": [{"url": VIRTUAL, "extension": [
            {"url": "channelType", "valueCoding": {"code": "tencent-meeting", "display": "腾讯会议"}},
            {"url": "addressUrl", "valueUrl": f"https://meeting.example/{uuid.uuid4().hex[:10]}"}]}],
    }


async def invitation_with_slots(alliance: Alliance) -> tuple[dict, list[str]]:
    """A teleconsultation to the county hospital, which publishes two free half-hour Slots
    (14:00 and 15:00 on 2030-06-01, +08:00)."""
    request, _, _ = await invite(alliance, "teleconsultation", alliance.county)
    schedule = await alliance.county.call("POST", "Schedule", {
        "resourceType": "Schedule", "active": True,
        "actor": [{"reference": alliance.county.reference}]})
    assert schedule.status_code == 201, schedule.text
    reference = f"Schedule/{schedule.json()['id']}"
    slots = []
    for hour in (14, 15):
        slot = await alliance.county.call("POST", "Slot", slot_body(
            reference, f"2030-06-01T{hour}:00:00+08:00", f"2030-06-01T{hour}:30:00+08:00"))
        assert slot.status_code == 201, slot.text
        slots.append(f"Slot/{slot.json()['id']}")
    return request, slots


class TestScheduling:
    async def test_find_book_cancel_reschedule(self, alliance: Alliance, api: Any) -> None:
        request, slots = await invitation_with_slots(alliance)
        county_role = await _practitioner_role(api, alliance.county.reference, "chief-physician", "cardiology")
        found = await alliance.township.call("GET", "Appointment/$find", params={
            "start": "2030-06-01T00:00:00+08:00", "end": "2030-06-01T23:59:00+08:00",
            "organization": alliance.county.reference})
        assert found.status_code == 200, found.text
        proposed = [e["resource"] for e in found.json()["entry"]]
        assert [p["slot"][0]["reference"] for p in proposed] == slots
        assert all(p["status"] == "proposed" for p in proposed)

        no_link = appointment(alliance, request, slots[0], alliance.county, county_role)
        no_link.pop("extension")
        refused = await alliance.township.call("POST", "Appointment/$book", no_link)
        assert refused.status_code == 422 and "virtualService" in diagnostics(refused)
        one_party = appointment(alliance, request, slots[0], alliance.county, county_role)
        one_party["participant"] = one_party["participant"][:1]
        refused = await alliance.township.call("POST", "Appointment/$book", one_party)
        assert refused.status_code == 422 and "invited party" in diagnostics(refused)

        booked = await alliance.township.call("POST", "Appointment/$book", {"resourceType": "Parameters", "parameter": [
            {"name": "appt-resource", "resource": appointment(alliance, request, slots[0], alliance.county, county_role)}]})
        assert booked.status_code == 200, booked.text
        booking = booked.json()["entry"][0]["resource"]
        assert booking["status"] == "booked" and booking["start"] == "2030-06-01T14:00:00+08:00"
        assert (await alliance.county.call("GET", slots[0])).json()["status"] == "busy"
        again = await alliance.county.call("POST", "Appointment",
                                           appointment(alliance, request, slots[0], alliance.county, county_role))
        assert again.status_code == 409
        freeing = (await alliance.county.call("GET", slots[0])).json()
        refused = await alliance.county.call("PUT", slots[0], {**freeing, "status": "free"})
        assert refused.status_code == 409

        moved = {**booking, "slot": [{"reference": slots[1]}]}
        moved.pop("start"), moved.pop("end")
        rescheduled = await alliance.township.call("PUT", f"Appointment/{booking['id']}", moved)
        assert rescheduled.status_code == 200, rescheduled.text
        assert (await alliance.county.call("GET", slots[0])).json()["status"] == "free"
        assert (await alliance.county.call("GET", slots[1])).json()["status"] == "busy"
        cancelled = await alliance.township.call("PUT", f"Appointment/{booking['id']}",
                                                 {**rescheduled.json(), "status": "cancelled"})
        assert cancelled.status_code == 200, cancelled.text
        assert (await alliance.county.call("GET", slots[1])).json()["status"] == "free"
        rebooked = await alliance.county.call("POST", "Appointment",
                                              appointment(alliance, request, slots[1], alliance.county, county_role))
        assert rebooked.status_code == 201, rebooked.text

    async def test_concurrent_bookings_of_one_slot_exactly_one_wins(self, alliance: Alliance, api: Any) -> None:
        request, slots = await invitation_with_slots(alliance)
        county_role = await _practitioner_role(api, alliance.county.reference, "chief-physician", "cardiology")
        body = appointment(alliance, request, slots[0], alliance.county, county_role)
        responses = await asyncio.gather(*(alliance.township.call("POST", "Appointment/$book", body) for _ in range(6)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200, 409, 409, 409, 409, 409], [r.text for r in responses if r.status_code not in (200, 409)]
        booked = await alliance.township.call("GET", "Appointment", params={"slot": slots[0], "status": "booked"})
        assert booked.json()["total"] == 1


class TestDeadlines:
    async def test_overdue_requests_escalate_and_the_worklist_orders_by_priority_then_deadline(
            self, system: Any, alliance: Alliance) -> None:
        from fhirkit.store.repository import Repository
        from fhirkit.workflow.deadlines import FLAG_SYSTEM, due_micros
        from servicekit.peers import SYSTEM_IDENTITY
        from telemedicine import deadlines

        _, routine, _ = await invite(alliance, "remote-ecg", alliance.ecg_center, priority="routine")
        _, urgent, _ = await invite(alliance, "remote-ecg", alliance.ecg_center, priority="urgent")
        worklist = await alliance.ecg_center.call("GET", "$telemedicine-worklist", params={
            "owner": alliance.ecg_center.reference, "code": "remote-diagnosis", "status": "requested"})
        assert worklist.status_code == 200, worklist.text
        order = [e["resource"]["id"] for e in worklist.json()["entry"]]
        assert order.index(urgent["id"]) < order.index(routine["id"])

        service = system.state.apps["telemedicine"]
        due = due_micros(routine)
        assert due is not None

        async def sweep_at(micros: int) -> dict:
            async with service.state.database.transaction(write=True) as conn:
                repo = Repository(conn, service.state.service.store, caller=SYSTEM_IDENTITY)
                await deadlines.sweep(repo, micros)
            return (await alliance.township.call("GET", f"Task/{routine['id']}")).json()

        assert "extension" not in await sweep_at(due - 60_000_000)
        level_one = await sweep_at(due + 60_000_000)
        escalation = {p["url"]: p for p in level_one["extension"][0]["extension"]}
        assert escalation["level"]["valueInteger"] == 1
        assert escalation["escalatedTo"]["valueReference"]["reference"] == alliance.county.reference
        assert any(t["code"] == "overdue" and t["system"] == FLAG_SYSTEM for t in level_one["meta"]["tag"])
        level_two = await sweep_at(due + 3 * 1_800_000_000)
        assert {p["url"]: p for p in level_two["extension"][0]["extension"]}["level"]["valueInteger"] == 2
        assert level_two["status"] == "requested"  # a late opinion is still wanted: nothing is cancelled

    def test_deadline_configuration(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from telemedicine import deadlines

        request = {"category": [{"coding": [{"system": CATEGORY, "code": "teleconsultation"}]}], "priority": "urgent"}
        assert deadlines.deadline_for(request).seconds == 24 * 3600
        monkeypatch.setenv("ALLIANCE_TELEMEDICINE_DEADLINES", '{"teleconsultation/urgent": "PT12H"}')
        assert deadlines.deadline_for(request).seconds == 12 * 3600
        monkeypatch.setenv("ALLIANCE_TELEMEDICINE_DEADLINES", '{"remote-ecg": "soon"}')
        with pytest.raises(ValueError):
            deadlines.configured()


class TestConversion:
    async def test_a_teleconsultation_becomes_a_referral_linked_both_ways(self, alliance: Alliance, api: Any) -> None:
        request, task, _ = await invite(alliance, "teleconsultation", alliance.county)
        county_role = await _practitioner_role(api, alliance.county.reference, "chief-physician", "cardiology")
        too_early = await operate(alliance.township, task, "convert-to-referral")
        assert too_early.status_code == 422
        accepted = (await operate(alliance.county, task, "accept")).json()
        assigned = (await operate(alliance.county, accepted, "assign-practitioner",
                                  parameters(practitioner=county_role))).json()
        note = await signed_report(alliance.county, alliance, county_role, kind="DocumentReference")
        done = (await operate(alliance.county, assigned, "complete", parameters(output=note))).json()
        assert done["status"] == "completed", done
        by_invited = await operate(alliance.county, done, "convert-to-referral")
        assert by_invited.status_code == 403

        converted = await operate(alliance.township, done, "convert-to-referral", parameters(reason="需来院行冠脉造影"))
        assert converted.status_code == 200, converted.text
        outputs = {o["type"]["text"]: o["valueReference"]["reference"] for o in converted.json()["output"]}
        referral_request = (await alliance.township.call("GET", outputs["referral"])).json()
        assert referral_request["basedOn"] == [{"reference": f"ServiceRequest/{request['id']}"}]
        assert referral_request["category"][0]["coding"][0]["code"] == "upward-referral"
        referral_task = (await alliance.county.call("GET", outputs["referral task"])).json()
        assert referral_task["status"] == "requested"
        assert referral_task["owner"]["reference"] == alliance.county.reference
        assert referral_task["basedOn"] == [{"reference": f"Task/{task['id']}"}]
        twice = await operate(alliance.township, converted.json(), "convert-to-referral")
        assert twice.status_code == 422

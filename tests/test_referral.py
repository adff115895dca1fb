"""Two-way referral through the gateway: submit, the state machine on every path, routing rules,
Provenance, forwarding and assignment, concurrency."""

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support import create_organization, eventually, local_day, outcome_code

BASE = "http://county-alliance.org/fhir"
LEVEL = f"{BASE}/CodeSystem/facility-level"
CATEGORY = f"{BASE}/CodeSystem/referral-category"
TASK_CODE = f"{BASE}/CodeSystem/task-code"


@dataclass
class Party:
    """An organization of the test alliance and how it calls the API."""

    api: Any
    reference: str
    level: str

    async def call(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        return await self.api.request(method, path, body, organization=self.reference, level=self.level, **kwargs)


@dataclass
class Alliance:
    province: Party
    city: Party
    county: Party
    township: Party
    other_township: Party
    village: Party
    foreign_county: Party
    chest_pain_center: Party
    stroke_center: Party
    patient: str


@pytest.fixture
async def alliance(api: Any) -> Alliance:
    province = await create_organization(api, "provincial-hospital", None, "省人民医院")
    city = await create_organization(api, "city-hospital", province, "市中心医院")
    county = await create_organization(api, "county-hospital", city, "县人民医院")
    township = await create_organization(api, "township-health-center", county, "溪口镇中心卫生院")
    other = await create_organization(api, "township-health-center", county, "石门镇卫生院")
    village = await create_organization(api, "village-clinic", township, "上坞村卫生室")
    foreign = await create_organization(api, "county-hospital", city, "邻县人民医院")
    chest_pain = await create_organization(api, "chest-pain-center", county, "胸痛中心")
    stroke = await create_organization(api, "stroke-center", county, "卒中中心")
    patient = await api.post("Patient", {"resourceType": "Patient", "name": [{"family": "陈", "given": ["桂英"]}],
                                         "gender": "female", "birthDate": "1952-03-08"})
    return Alliance(
        province=Party(api, province, "provincial"), city=Party(api, city, "city"), county=Party(api, county, "county"),
        township=Party(api, township, "township"), other_township=Party(api, other, "township"),
        village=Party(api, village, "village"), foreign_county=Party(api, foreign, "county"),
        chest_pain_center=Party(api, chest_pain, "center"), stroke_center=Party(api, stroke, "center"),
        patient=f"Patient/{patient.json()['id']}",
    )


def referral_request(alliance: Alliance, sender: Party, receiver: Party | None, direction: str = "upward-referral",
                     **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": "active",
        "intent": "order",
        "category": [{"coding": [{"system": CATEGORY, "code": direction}]}],
        "priority": "urgent",
        "subject": {"reference": alliance.patient},
        "requester": {"reference": sender.reference},
        "reasonCode": [{"text": "反复胸闷一周，心电图ST段改变"}],
        "requisition": {"system": f"{BASE}/sid/referral-chain", "value": uuid.uuid4().hex},
    }
    if receiver is not None:
        body["performer"] = [{"reference": receiver.reference}]
    if direction == "downward-referral":
        body["patientInstruction"] = "按时服用阿司匹林，两周后社区复查血压"
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def referral_task(request_id: str, alliance: Alliance, sender: Party, receiver: Party | None) -> dict[str, Any]:
    task: dict[str, Any] = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "priority": "urgent",
        "code": {"coding": [{"system": TASK_CODE, "code": "referral"}]},
        "focus": {"reference": f"ServiceRequest/{request_id}"},
        "for": {"reference": alliance.patient},
        "requester": {"reference": sender.reference},
    }
    if receiver is not None:
        task["owner"] = {"reference": receiver.reference}
    return task


async def submit(alliance: Alliance, sender: Party, receiver: Party | None, direction: str = "upward-referral") -> dict:
    request = await sender.call("POST", "ServiceRequest", referral_request(alliance, sender, receiver, direction))
    assert request.status_code == 201, request.text
    task = await sender.call("POST", "Task", referral_task(request.json()["id"], alliance, sender, receiver))
    assert task.status_code == 201, task.text
    return task.json()


def etag(task: dict) -> dict[str, str]:
    return {"If-Match": f'W/"{task["meta"]["versionId"]}"'}


def reason(text: str) -> dict:
    return {"resourceType": "Parameters", "parameter": [{"name": "reason", "valueString": text}]}


async def operate(party: Party, task: dict, operation: str, body: dict | None = None) -> Any:
    return await party.call("POST", f"Task/{task['id']}/${operation}", body or {"resourceType": "Parameters"},
                            headers=etag(task))


async def outcome_document(party: Party, alliance: Alliance) -> str:
    document = await party.call("POST", "DocumentReference", {
        "resourceType": "DocumentReference", "status": "current",
        "type": {"text": "出院小结 / 回转单"}, "subject": {"reference": alliance.patient},
        "content": [{"attachment": {"contentType": "text/plain", "data": "5Ye66Zmi5bCP57uT"}}],
    })
    assert document.status_code == 201, document.text
    return f"DocumentReference/{document.json()['id']}"


class TestClosedLoop:
    async def test_upward_referral_accepted_started_completed_with_outcome(self, alliance: Alliance) -> None:
        task = await submit(alliance, alliance.township, alliance.county)
        accepted = await operate(alliance.county, task, "accept")
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["status"] == "accepted"
        assert accepted.json()["businessStatus"]["coding"][0]["code"] == "accepted"
        started = await operate(alliance.county, accepted.json(), "start")
        assert started.json()["status"] == "in-progress"
        assert "start" in started.json()["executionPeriod"]

        refused = await operate(alliance.county, started.json(), "complete")
        assert refused.status_code == 422
        assert "Task.output" in refused.json()["issue"][0]["diagnostics"]

        document = await outcome_document(alliance.county, alliance)
        done = await operate(alliance.county, started.json(), "complete", {"resourceType": "Parameters", "parameter": [
            {"name": "output", "valueReference": {"reference": document}}]})
        assert done.status_code == 200, done.text
        assert done.json()["status"] == "completed"

        seen_by_sender = (await alliance.township.call("GET", f"Task/{task['id']}")).json()
        assert seen_by_sender["status"] == "completed"
        assert seen_by_sender["output"][0]["valueReference"]["reference"] == document
        # The sender reads the outcome document through the grant its referral gave it.
        assert (await eventually(lambda: alliance.township.call("GET", document))).status_code == 200

        provenance = await alliance.township.call("GET", "Provenance", params={"target": f"Task/{task['id']}"})
        activities = sorted(e["resource"]["activity"]["coding"][0]["code"] for e in provenance.json()["entry"])
        assert activities == ["accept", "complete", "start"]
        assert all(e["resource"]["agent"][0]["who"]["reference"] == alliance.county.reference
                   for e in provenance.json()["entry"])

    async def test_hold_and_resume_return_to_the_status_before(self, alliance: Alliance) -> None:
        task = await submit(alliance, alliance.township, alliance.county)
        accepted = (await operate(alliance.county, task, "accept")).json()
        no_reason = await operate(alliance.county, accepted, "hold")
        assert no_reason.status_code == 422
        held = await operate(alliance.county, accepted, "hold", reason("请补充近期血常规结果"))
        assert held.json()["status"] == "on-hold"
        resumed = await operate(alliance.county, held.json(), "resume")
        assert resumed.json()["status"] == "accepted"
        assert "statusReason" not in resumed.json()


class TestRefusals:
    async def test_only_the_receiver_moves_it_forward_and_only_the_sender_cancels(self, alliance: Alliance) -> None:
        task = await submit(alliance, alliance.township, alliance.county)
        by_sender = await operate(alliance.township, task, "accept")
        assert by_sender.status_code == 403
        assert outcome_code(by_sender) == "forbidden"
        by_stranger = await operate(alliance.other_township, task, "accept")
        assert by_stranger.status_code in (403, 404), by_stranger.text
        by_receiver = await operate(alliance.county, task, "cancel", reason("不想要了"))
        assert by_receiver.status_code == 403
        cancelled = await operate(alliance.township, task, "cancel", reason("患者决定不转诊"))
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "cancelled"

    async def test_a_wrong_state_is_422_listing_the_allowed_moves(self, alliance: Alliance) -> None:
        task = await submit(alliance, alliance.township, alliance.county)
        response = await operate(alliance.county, task, "start")
        assert response.status_code == 422
        message = response.json()["issue"][0]["diagnostics"]
        assert "$accept" in message and "$reject" in message

    async def test_reject_needs_a_reason(self, alliance: Alliance) -> None:
        task = await submit(alliance, alliance.township, alliance.county)
        response = await operate(alliance.county, task, "reject")
        assert response.status_code == 422
        assert response.json()["issue"][0]["expression"] == ["Task.statusReason"]
        assert (await alliance.county.call("GET", f"Task/{task['id']}")).json()["status"] == "requested"

    async def test_stale_or_missing_if_match(self, alliance: Alliance) -> None:
        task = await submit(alliance, alliance.township, alliance.county)
        received = (await operate(alliance.county, task, "receive")).json()
        stale = await operate(alliance.county, task, "accept")  # still the version before receive
        assert stale.status_code == 412
        missing = await alliance.county.call("POST", f"Task/{received['id']}/$accept", {"resourceType": "Parameters"})
        assert missing.status_code == 428

    async def test_the_state_machine_holds_on_plain_update_and_patch(self, alliance: Alliance) -> None:
        task = await submit(alliance, alliance.township, alliance.county)
        skipped = await alliance.county.call("PUT", f"Task/{task['id']}", {**task, "status": "completed"},
                                             headers=etag(task))
        assert skipped.status_code == 422
        without_version = await alliance.county.call("PUT", f"Task/{task['id']}", {**task, "status": "accepted"})
        assert without_version.status_code == 428
        by_sender = await alliance.township.call("PUT", f"Task/{task['id']}", {**task, "status": "accepted"},
                                                 headers=etag(task))
        assert by_sender.status_code == 403
        patched = await alliance.county.call(
            "PATCH", f"Task/{task['id']}", [{"op": "replace", "path": "/status", "value": "accepted"}],
            headers={**etag(task), "Content-Type": "application/json-patch+json"})
        assert patched.status_code == 200, patched.text
        assert patched.json()["status"] == "accepted"
        provenance = await alliance.county.call("GET", "Provenance", params={"target": f"Task/{task['id']}"})
        assert provenance.json()["total"] == 1

    async def test_a_transaction_entry_is_held_to_the_same_rules(self, alliance: Alliance) -> None:
        task = await submit(alliance, alliance.township, alliance.county)
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [{
            "resource": {**task, "status": "completed"},
            "request": {"method": "PUT", "url": f"Task/{task['id']}", "ifMatch": f'W/"{task["meta"]["versionId"]}"'}}]}
        response = await alliance.county.call("POST", "", bundle)
        assert response.status_code == 422


class TestRouting:
    async def test_required_content(self, alliance: Alliance) -> None:
        body = referral_request(alliance, alliance.township, alliance.county, reasonCode=None, priority=None)
        response = await alliance.township.call("POST", "ServiceRequest", body)
        assert response.status_code == 422
        message = response.json()["issue"][0]["diagnostics"]
        assert "reasonCode or reasonReference" in message and "priority" in message

    @pytest.mark.parametrize("direction,sender,receiver", [
        ("upward-referral", "county", "township"),
        ("downward-referral", "township", "county"),
        ("lateral-referral", "township", "county"),
    ])
    async def test_the_wrong_direction_is_422(self, alliance: Alliance, direction: str, sender: str, receiver: str) -> None:
        from_party, to_party = getattr(alliance, sender), getattr(alliance, receiver)
        response = await from_party.call("POST", "ServiceRequest", referral_request(alliance, from_party, to_party, direction))
        assert response.status_code == 422
        assert direction in response.json()["issue"][0]["diagnostics"]

    async def test_outside_the_alliance_is_422_but_partner_hospitals_are_fine(self, alliance: Alliance) -> None:
        outside = await alliance.township.call(
            "POST", "ServiceRequest", referral_request(alliance, alliance.township, alliance.foreign_county, "upward-referral"))
        assert outside.status_code == 422
        assert "outside the alliance" in outside.json()["issue"][0]["diagnostics"]
        to_province = await alliance.township.call(
            "POST", "ServiceRequest", referral_request(alliance, alliance.township, alliance.province))
        assert to_province.status_code == 201
        downward = await alliance.city.call(
            "POST", "ServiceRequest", referral_request(alliance, alliance.city, alliance.village, "downward-referral"))
        assert downward.status_code == 201


class TestOnward:
    async def test_a_rejected_referral_is_forwarded_and_the_sender_sees_the_chain(self, alliance: Alliance) -> None:
        task = await submit(alliance, alliance.township, alliance.county)
        rejected = (await operate(alliance.county, task, "reject", reason("本院无心外科手术条件"))).json()
        forwarded = await operate(alliance.county, rejected, "forward", {"resourceType": "Parameters", "parameter": [
            {"name": "owner", "valueReference": {"reference": alliance.city.reference}},
            {"name": "reason", "valueString": "需行急诊PCI"}]})
        assert forwarded.status_code == 201, forwarded.text
        hop = forwarded.json()
        assert hop["status"] == "requested" and hop["owner"]["reference"] == alliance.city.reference
        original = (await alliance.township.call("GET", f"Task/{task['id']}")).json()
        assert original["businessStatus"]["coding"][0]["code"] == "referred-onward"
        chain = await alliance.township.call("GET", "Task", params={"based-on": f"Task/{task['id']}"})
        assert [e["resource"]["id"] for e in chain.json()["entry"]] == [hop["id"]]
        accepted = await operate(alliance.city, hop, "accept")
        assert accepted.status_code == 200
        requisition = (await alliance.township.call("GET", hop["focus"]["reference"])).json()["requisition"]
        same_chain = await alliance.township.call(
            "GET", "ServiceRequest", params={"requisition": f"{requisition['system']}|{requisition['value']}"})
        assert same_chain.json()["total"] == 2

    async def test_forwarding_a_referral_that_is_not_rejected_is_422(self, alliance: Alliance) -> None:
        task = await submit(alliance, alliance.township, alliance.county)
        response = await operate(alliance.county, task, "forward", {"resourceType": "Parameters", "parameter": [
            {"name": "owner", "valueReference": {"reference": alliance.city.reference}}]})
        assert response.status_code == 422

    async def test_the_referral_desk_assigns_a_referral_without_receiver(self, alliance: Alliance) -> None:
        task = await submit(alliance, alliance.village, None)
        not_desk = await operate(alliance.township, task, "assign", {"resourceType": "Parameters", "parameter": [
            {"name": "owner", "valueReference": {"reference": alliance.township.reference}}]})
        assert not_desk.status_code == 404  # not addressed to the township: it cannot even see it
        inbox = await alliance.county.call("GET", "Task", params={"owner:missing": "true", "status": "requested",
                                                                  "_id": task["id"]})
        assert inbox.json()["total"] == 1
        assigned = await operate(alliance.county, task, "assign", {"resourceType": "Parameters", "parameter": [
            {"name": "owner", "valueReference": {"reference": alliance.township.reference}}]})
        assert assigned.status_code == 200, assigned.text
        assert assigned.json()["owner"]["reference"] == alliance.township.reference
        accepted = await operate(alliance.township, assigned.json(), "accept")
        assert accepted.status_code == 200


class TestActions:
    async def test_available_actions_answer_for_the_caller(self, alliance: Alliance) -> None:
        task = await submit(alliance, alliance.township, alliance.county)

        async def actions(party: Party) -> set[str]:
            response = await party.call("GET", f"Task/{task['id']}/$available-actions")
            assert response.status_code == 200
            return {p["part"][0]["valueCode"] for p in response.json()["parameter"] if p["name"] == "action"}

        assert await actions(alliance.county) == {"receive", "accept", "reject"}
        assert await actions(alliance.township) == {"cancel"}


class TestConcurrency:
    async def test_concurrent_accept_and_cancel_exactly_one_wins(self, alliance: Alliance) -> None:
        task = await submit(alliance, alliance.township, alliance.county)
        accept, cancel = await asyncio.gather(
            operate(alliance.county, task, "accept"),
            operate(alliance.township, task, "cancel", reason("患者已自行就医")),
        )
        statuses = sorted([accept.status_code, cancel.status_code])
        assert statuses[0] == 200 and statuses[1] in (412, 422), statuses
        final = (await alliance.township.call("GET", f"Task/{task['id']}")).json()
        assert final["status"] == ("accepted" if accept.status_code == 200 else "cancelled")


class TestTransactionSubmit:
    async def test_submit_as_one_transaction_with_urn_uuids(self, alliance: Alliance) -> None:
        request_url, condition_url = f"urn:uuid:{uuid.uuid4()}", f"urn:uuid:{uuid.uuid4()}"
        request = referral_request(alliance, alliance.township, alliance.county,
                                   reasonReference=[{"reference": condition_url}], reasonCode=None)
        task = referral_task("placeholder", alliance, alliance.township, alliance.county)
        task["focus"] = {"reference": request_url}
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": condition_url, "resource": {"resourceType": "Condition", "subject": {"reference": alliance.patient},
                                                     "code": {"text": "不稳定型心绞痛"}},
             "request": {"method": "POST", "url": "Condition"}},
            {"fullUrl": request_url, "resource": request, "request": {"method": "POST", "url": "ServiceRequest"}},
            {"resource": task, "request": {"method": "POST", "url": "Task"}},
        ]}
        response = await alliance.township.call("POST", "", bundle)
        assert response.status_code == 200, response.text
        statuses = [e["response"]["status"] for e in response.json()["entry"]]
        assert statuses == ["201 Created"] * 3


GREEN = f"{BASE}/StructureDefinition/green-channel"


def green(pathway: str) -> list[dict]:
    return [{"url": GREEN, "extension": [
        {"url": "pathway", "valueCoding": {"system": f"{BASE}/CodeSystem/green-channel-pathway", "code": pathway}},
        {"url": "eta", "valueDateTime": "2026-11-23T10:30:00+08:00"},
        {"url": "keyFindings", "valueString": "胸痛2小时，心电图V1-V4 ST段抬高"}]}]


def _seconds(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class TestGreenChannel:
    async def test_chest_pain_goes_to_the_chest_pain_center_at_once_with_a_timeline(self, alliance: Alliance) -> None:
        body = referral_request(alliance, alliance.township, None, priority="stat", extension=green("chest-pain"))
        request = await alliance.township.call("POST", "ServiceRequest", body)
        assert request.status_code == 201, request.text
        assert request.json()["performer"] == [{"reference": alliance.chest_pain_center.reference}]
        task = await alliance.township.call("POST", "Task", referral_task(request.json()["id"], alliance, alliance.township, None))
        assert task.status_code == 201, task.text
        task = task.json()
        assert task["owner"]["reference"] == alliance.chest_pain_center.reference
        deadline = _seconds(task["restriction"]["period"]["end"]) - _seconds(task["authoredOn"])
        assert 599 <= deadline <= 601  # ten minutes
        accepted = (await operate(alliance.chest_pain_center, task, "accept")).json()
        arrived = (await operate(alliance.chest_pain_center, accepted, "start")).json()
        from referral.green_channel import timeline

        moments = timeline(arrived)
        assert set(moments) == {"sent", "accepted", "arrived"}
        assert _seconds(moments["sent"]) <= _seconds(moments["accepted"]) <= _seconds(moments["arrived"])

    async def test_stroke_to_another_receiver_and_a_non_stat_priority_are_refused(self, alliance: Alliance) -> None:
        wrong_receiver = referral_request(alliance, alliance.township, alliance.county, priority="stat", extension=green("stroke"))
        response = await alliance.township.call("POST", "ServiceRequest", wrong_receiver)
        assert response.status_code == 422
        assert alliance.stroke_center.reference in response.json()["issue"][0]["diagnostics"]
        not_stat = referral_request(alliance, alliance.township, None, priority="urgent", extension=green("stroke"))
        assert (await alliance.township.call("POST", "ServiceRequest", not_stat)).status_code == 422
        unknown = referral_request(alliance, alliance.township, None, priority="stat", extension=green("toothache"))
        assert (await alliance.township.call("POST", "ServiceRequest", unknown)).status_code == 422
        to_center = referral_request(alliance, alliance.village, alliance.stroke_center, priority="stat", extension=green("stroke"))
        assert (await alliance.village.call("POST", "ServiceRequest", to_center)).status_code == 201


class TestDeadlines:
    async def test_overdue_referrals_escalate_then_routine_ones_expire(self, system, alliance: Alliance) -> None:
        from fhirkit.search.values import date_range, from_micros, to_micros
        from fhirkit.store.repository import Repository
        from referral import deadlines
        from servicekit.peers import SYSTEM_IDENTITY

        body = referral_request(alliance, alliance.township, alliance.county, priority="routine")
        request = await alliance.township.call("POST", "ServiceRequest", body)
        task = (await alliance.township.call(
            "POST", "Task", referral_task(request.json()["id"], alliance, alliance.township, alliance.county))).json()
        due = date_range(task["restriction"]["period"]["end"])[1]
        service = system.state.apps["referral"]

        async def sweep_at(micros: int) -> dict:
            async with service.state.database.transaction(write=True) as conn:
                repo = Repository(conn, service.state.service.store, caller=SYSTEM_IDENTITY)
                await deadlines.sweep(repo, micros)
            return (await alliance.township.call("GET", f"Task/{task['id']}")).json()

        assert "extension" not in await sweep_at(due - 60_000_000)
        day = 86_400_000_000
        level_one = await sweep_at(due + 60_000_000)
        escalation = {p["url"]: p for p in level_one["extension"][0]["extension"]}
        assert escalation["level"]["valueInteger"] == 1
        assert escalation["escalatedTo"]["valueReference"]["reference"] == alliance.county.reference
        overdue = await alliance.county.call("GET", "Task", params={
            "_tag": f"{deadlines.FLAG_SYSTEM}|overdue", "_id": task["id"]})
        assert overdue.json()["total"] == 1
        # The routine deadline counts working days: from a Thursday it is four calendar days long.
        length = to_micros(deadlines.parse_duration("P2WD").after(from_micros(due))) - due
        assert 2 * day <= length <= 4 * day
        assert {p["url"]: p for p in (await sweep_at(due + length))["extension"][0]["extension"]}[
            "level"]["valueInteger"] == 1
        level_two = await sweep_at(due + length + 60_000_000)
        assert {p["url"]: p for p in level_two["extension"][0]["extension"]}["level"]["valueInteger"] == 2
        assert (await sweep_at(due + 2 * length))["status"] != "cancelled"
        expired = await sweep_at(due + 2 * length + 60_000_000)
        assert expired["status"] == "cancelled"
        assert expired["statusReason"]["coding"][0]["code"] == "expired"
        provenance = await alliance.township.call("GET", "Provenance", params={"target": f"Task/{task['id']}"})
        assert [e["resource"]["activity"]["coding"][0]["code"] for e in provenance.json()["entry"]] == ["cancel"]

    def test_durations_and_working_days(self) -> None:
        from datetime import datetime

        from referral.deadlines import parse_duration

        friday = datetime(2026, 11, 20, 9, 0)
        assert parse_duration("P2WD").after(friday) == datetime(2026, 11, 24, 9, 0)  # skips the weekend
        assert parse_duration("PT10M").after(friday) == datetime(2026, 11, 20, 9, 10)
        assert parse_duration("P1DT2H").after(friday) == datetime(2026, 11, 21, 11, 0)
        with pytest.raises(ValueError):
            parse_duration("two days")


class TestStatistics:
    async def test_counts_rates_times_and_who_may_see_them(self, alliance: Alliance) -> None:
        up = await submit(alliance, alliance.township, alliance.county)
        await operate(alliance.county, up, "accept")
        rejected = await submit(alliance, alliance.township, alliance.county)
        await operate(alliance.county, rejected, "reject", reason("床位已满"))
        await submit(alliance, alliance.county, alliance.township, "downward-referral")
        body = referral_request(alliance, alliance.township, None, priority="stat", extension=green("chest-pain"))
        request = (await alliance.township.call("POST", "ServiceRequest", body)).json()
        chest = (await alliance.township.call("POST", "Task", referral_task(request["id"], alliance, alliance.township, None))).json()
        await operate(alliance.chest_pain_center, chest, "accept")

        period = local_day(up["authoredOn"])
        response = await alliance.county.call("GET", "$referral-statistics",
                                              params={"period": period, "organization": alliance.township.reference})
        assert response.status_code == 200, response.text
        figures = {p["name"]: p for p in response.json()["parameter"]}
        assert figures["total"]["valueInteger"] == 4
        assert (figures["upward"]["valueInteger"], figures["downward"]["valueInteger"]) == (3, 1)
        assert figures["accepted"]["valueInteger"] == 2 and figures["rejected"]["valueInteger"] == 1
        assert figures["acceptanceRate"]["valueDecimal"] == round(2 / 3, 4)
        assert figures["responseMinutesMedian"]["valueDecimal"] >= 0
        assert figures["answeredOnTime"]["valueInteger"] == 3
        green_parts = {p["name"]: p for p in figures["greenChannel"]["part"]}
        chest_parts = {p["name"]: p for p in green_parts["chest-pain"]["part"]}
        assert chest_parts["count"]["valueInteger"] == 1

        own = await alliance.township.call("GET", "$referral-statistics", params={"period": period})
        assert own.status_code == 200
        assert {p["name"]: p for p in own.json()["parameter"]}["organization"]["valueReference"]["reference"] == alliance.township.reference
        other = await alliance.township.call("GET", "$referral-statistics",
                                             params={"period": period, "organization": alliance.other_township.reference})
        assert other.status_code == 403
        bad = await alliance.county.call("GET", "$referral-statistics", params={"period": "last week"})
        assert bad.status_code == 400


class TestDownwardFollowUp:
    async def test_a_downward_referral_without_a_care_plan_is_refused(self, alliance: Alliance) -> None:
        body = referral_request(alliance, alliance.county, alliance.township, "downward-referral", patientInstruction=None)
        response = await alliance.county.call("POST", "ServiceRequest", body)
        assert response.status_code == 422
        assert "care plan" in response.json()["issue"][0]["diagnostics"]

    async def test_accepting_creates_follow_up_tasks_whose_completion_the_county_sees(self, alliance: Alliance) -> None:
        plan = await alliance.county.call("POST", "CarePlan", {
            "resourceType": "CarePlan", "status": "active", "intent": "plan",
            "subject": {"reference": alliance.patient}, "title": "脑卒中康复期管理",
            "activity": [
                {"detail": {"status": "scheduled", "description": "每周测量血压并记录",
                            "scheduledPeriod": {"start": "2026-11-24", "end": "2026-12-24"}}},
                {"detail": {"status": "scheduled", "description": "两周后随访，评估肢体功能"}},
            ]})
        assert plan.status_code == 201, plan.text
        body = referral_request(alliance, alliance.county, alliance.township, "downward-referral",
                                supportingInfo=[{"reference": f"CarePlan/{plan.json()['id']}"}])
        request = await alliance.county.call("POST", "ServiceRequest", body)
        assert request.status_code == 201, request.text
        task = (await alliance.county.call(
            "POST", "Task", referral_task(request.json()["id"], alliance, alliance.county, alliance.township))).json()
        accepted = await operate(alliance.township, task, "accept")
        assert accepted.status_code == 200, accepted.text

        follow_ups = await alliance.county.call("GET", "Task", params={"part-of": f"Task/{task['id']}", "_sort": "_id"})
        entries = [e["resource"] for e in follow_ups.json()["entry"]]
        assert sorted(t["description"] for t in entries) == ["两周后随访，评估肢体功能", "每周测量血压并记录"]
        assert all(t["owner"]["reference"] == alliance.township.reference for t in entries)
        assert all(t["requester"]["reference"] == alliance.county.reference for t in entries)

        first = entries[0]
        assert (await operate(alliance.county, first, "complete")).status_code == 403  # the clinic does the work
        done = await operate(alliance.township, first, "complete")
        assert done.status_code == 200, done.text
        seen = (await alliance.county.call("GET", f"Task/{first['id']}")).json()
        assert seen["status"] == "completed"
        cancelled = await operate(alliance.county, entries[1], "cancel", reason("患者已转至上级医院"))
        assert cancelled.status_code == 200


class TestInbox:
    async def test_the_receiver_inbox_sorts_by_clinical_priority_and_includes_request_and_patient(self, alliance: Alliance) -> None:
        for priority in ("routine", "stat", "urgent"):
            body = referral_request(alliance, alliance.village, alliance.township, priority=priority)
            request = (await alliance.village.call("POST", "ServiceRequest", body)).json()
            task = referral_task(request["id"], alliance, alliance.village, alliance.township)
            task["priority"] = priority
            assert (await alliance.village.call("POST", "Task", task)).status_code == 201
        inbox = await alliance.township.call("GET", "Task", params=[
            ("owner", alliance.township.reference), ("status", "requested,received"),
            ("_sort", "-priority,authored-on"), ("_include", "Task:focus"), ("_include", "Task:patient")])
        assert inbox.status_code == 200, inbox.text
        entries = inbox.json()["entry"]
        matches = [e["resource"] for e in entries if e["search"]["mode"] == "match"]
        assert [t["priority"] for t in matches] == ["stat", "urgent", "routine"]
        included = [e for e in entries if e["search"]["mode"] == "include"]
        assert "ServiceRequest" in {e["resource"]["resourceType"] for e in included}
        # The Patient lives in the directory: the gateway reads it there and includes it once.
        patients = [e for e in included if e["resource"]["resourceType"] == "Patient"]
        assert {f"Patient/{e['resource']['id']}" for e in patients} == {t["for"]["reference"] for t in matches}
        assert len(patients) == len({e["fullUrl"] for e in patients})
        assert all(e["fullUrl"].endswith(f"/Patient/{e['resource']['id']}") for e in patients)
        assert not [e for e in entries if e["search"]["mode"] == "outcome"]  # nothing left out

    async def test_the_next_page_keeps_the_foreign_include(self, alliance: Alliance) -> None:
        for _ in range(2):
            request = (await alliance.village.call(
                "POST", "ServiceRequest", referral_request(alliance, alliance.village, alliance.township))).json()
            task = referral_task(request["id"], alliance, alliance.village, alliance.township)
            assert (await alliance.village.call("POST", "Task", task)).status_code == 201
        first = (await alliance.township.call("GET", "Task", params=[
            ("owner", alliance.township.reference), ("_count", "1"), ("_include", "Task:patient")])).json()
        following = next(link["url"] for link in first["link"] if link["relation"] == "next")
        assert "_include=Task%3Apatient" in following
        second = (await alliance.township.call("GET", following.split("/fhir/", 1)[1])).json()
        modes = sorted(e["search"]["mode"] for e in second["entry"])
        assert modes == ["include", "match"]

    async def test_a_foreign_include_needs_the_scope_to_read_its_type(self, alliance: Alliance) -> None:
        request = (await alliance.village.call(
            "POST", "ServiceRequest", referral_request(alliance, alliance.village, alliance.township))).json()
        task = referral_task(request["id"], alliance, alliance.village, alliance.township)
        assert (await alliance.village.call("POST", "Task", task)).status_code == 201
        tasks_only = await alliance.township.call("GET", "Task", params=[
            ("owner", alliance.township.reference), ("_include", "Task:patient")], scope="system/Task.rs")
        assert tasks_only.status_code == 200, tasks_only.text
        entries = tasks_only.json()["entry"]
        assert not [e for e in entries if e["search"]["mode"] == "include"]
        warning = [e for e in entries if e["search"]["mode"] == "outcome"]
        assert warning and "Patient" in warning[0]["resource"]["issue"][0]["diagnostics"]

    async def test_a_foreign_include_with_no_matches_adds_nothing(self, alliance: Alliance) -> None:
        empty = await alliance.township.call("GET", "Task", params=[
            ("owner", alliance.township.reference), ("status", "entered-in-error"), ("_include", "Task:patient")])
        assert empty.status_code == 200, empty.text
        assert empty.json()["total"] == 0 and not empty.json().get("entry")


class TestScheduler:
    async def test_the_scheduled_sweep_escalates_a_referral_past_its_deadline(self, system, alliance: Alliance) -> None:
        from referral import scheduler

        body = referral_request(alliance, alliance.township, alliance.county, priority="routine")
        request = (await alliance.township.call("POST", "ServiceRequest", body)).json()
        task = referral_task(request["id"], alliance, alliance.township, alliance.county)
        task["restriction"] = {"period": {"end": "2020-01-01T00:00:00Z"}}  # a client's earlier deadline is kept
        created = (await alliance.township.call("POST", "Task", task)).json()
        assert created["restriction"]["period"]["end"] == "2020-01-01T00:00:00Z"
        report = await scheduler.sweep_once(system.state.apps["referral"])
        assert report is not None and report.examined >= 1
        swept = (await alliance.township.call("GET", f"Task/{created['id']}")).json()
        assert swept["status"] == "cancelled"  # routine and long past: expired
        assert swept["statusReason"]["coding"][0]["code"] == "expired"
        jobs = [t.get_name() for t in asyncio.all_tasks()]
        assert "referral:deadline_scheduler" in jobs


class TestChain:
    async def test_five_tiers_four_hops_one_requisition_the_first_sender_sees_every_hop(self, alliance: Alliance) -> None:
        requisition = {"system": f"{BASE}/sid/referral-chain", "value": uuid.uuid4().hex}
        hops = [(alliance.village, alliance.township), (alliance.township, alliance.county),
                (alliance.county, alliance.city), (alliance.city, alliance.province)]
        previous_request: str | None = None
        tasks = []
        for sender, receiver in hops:
            extra = {"requisition": requisition}
            if previous_request:
                extra["basedOn"] = [{"reference": previous_request}]
            request = await sender.call("POST", "ServiceRequest", referral_request(alliance, sender, receiver, **extra))
            assert request.status_code == 201, request.text
            previous_request = f"ServiceRequest/{request.json()['id']}"
            task = await sender.call("POST", "Task", referral_task(request.json()["id"], alliance, sender, receiver))
            accepted = await operate(receiver, task.json(), "accept")
            assert accepted.status_code == 200, accepted.text
            tasks.append(accepted.json())
        last = tasks[-1]
        started = (await operate(alliance.province, last, "start")).json()
        document = await outcome_document(alliance.province, alliance)
        await operate(alliance.province, started, "complete", {"resourceType": "Parameters", "parameter": [
            {"name": "output", "valueReference": {"reference": document}}]})

        token = f"{requisition['system']}|{requisition['value']}"
        chain = await alliance.village.call("GET", "Task", params={"focus:ServiceRequest.requisition": token,
                                                                  "_sort": "authored-on"})
        assert chain.status_code == 200, chain.text
        seen = [e["resource"] for e in chain.json()["entry"]]
        assert [t["owner"]["reference"] for t in seen] == [r.reference for _, r in hops]
        assert seen[-1]["status"] == "completed"
        assert seen[-1]["output"][0]["valueReference"]["reference"] == document

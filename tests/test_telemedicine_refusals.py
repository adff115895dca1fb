"""Telemedicine's unhappy paths, its privacy and its notifications, through the gateway: every
refusal of the invitation, the report, scheduling and the system operations is an
OperationOutcome with its status and changes nothing; a third organization sees nothing of an
invitation it is not party to; concurrent transitions of one Task leave one winner and one
Provenance; booking, moving and cancelling a session notifies both parties' rest-hooks.

The alliance, the invitation and the report come from tests/test_telemedicine.py."""

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.live import NotificationReceiver
from tests.support import outcome_code
from tests.test_subscriptions import status_of, subscription
from tests.test_telemedicine import (
    CATEGORY,
    Alliance,
    Party,
    _practitioner_role,
    appointment,
    diagnostics,
    etag,
    invitation,
    invitation_with_slots,
    invite,
    new_alliance,
    operate,
    parameters,
    signed_report,
)


def issue(response: Any) -> dict:
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    return body["issue"][0]


async def ids_found(party: Party, resource_type: str, **params: str) -> list[str]:
    response = await party.call("GET", resource_type, params=params)
    assert response.status_code == 200, response.text
    return [e["resource"]["id"] for e in response.json().get("entry", []) if e.get("search", {}).get("mode") != "include"]


@pytest.fixture
async def alliance(api: Any) -> Alliance:
    return await new_alliance(api)


class TestInvitationRefusals:
    async def test_a_malformed_json_body_to_a_task_operation_is_400_and_changes_nothing(
            self, alliance: Alliance) -> None:
        _, task, _ = await invite(alliance, "teleconsultation", alliance.county)
        for body in (b'{"resourceType": "Parameters", "parameter": [', b"\xff\xfe{}"):
            response = await alliance.county.call("POST", f"Task/{task['id']}/$accept", body, headers=etag(task))
            assert response.status_code == 400, response.text
            assert outcome_code(response) == "invalid"
        seen = (await alliance.township.call("GET", f"Task/{task['id']}")).json()
        assert (seen["status"], seen["meta"]["versionId"]) == ("requested", task["meta"]["versionId"])
        provenance = await alliance.township.call("GET", "Provenance", params={"target": f"Task/{task['id']}"})
        assert provenance.json()["total"] == 0
        accepted = await operate(alliance.county, task, "accept")  # the same call, well formed, goes through
        assert accepted.status_code == 200, accepted.text

    async def test_a_body_that_is_not_well_formed_parameters_is_400(self, alliance: Alliance) -> None:
        _, task, _ = await invite(alliance, "teleconsultation", alliance.county)
        for body in ({"resourceType": "Parameters", "parameter": "reason"},
                     {"resourceType": "Parameters", "parameter": [1]},
                     {"resourceType": "Parameters", "parameter": [{"name": "reason", "part": "x"}]},
                     {"resourceType": "Patient"}, [{"name": "reason"}], "accept"):
            for name in ("accept", "reject", "assign-practitioner"):
                response = await operate(alliance.county, task, name, body)
                assert response.status_code == 400, (name, body, response.text)
                assert outcome_code(response) == "invalid"

    async def test_an_unknown_telemedicine_category_is_422_naming_the_category(self, alliance: Alliance) -> None:
        _, _, supporting = await invite(alliance, "remote-ecg", alliance.ecg_center)
        body = invitation(alliance, "remote-ecg", alliance.ecg_center, supporting)
        body["category"] = [{"coding": [{"system": CATEGORY, "code": "remote-ultrasound"}]}]
        response = await alliance.township.call("POST", "ServiceRequest", body)
        assert response.status_code == 422, response.text
        assert issue(response)["code"] == "business-rule"
        assert issue(response)["expression"] == ["ServiceRequest.category"]
        assert "remote-ecg" in issue(response)["diagnostics"]  # it lists the codes it knows
        chain = await ids_found(alliance.township, "ServiceRequest", requisition=body["requisition"]["value"])
        assert chain == []

    async def test_supporting_info_naming_a_result_that_does_not_exist_is_422(self, alliance: Alliance) -> None:
        _, _, supporting = await invite(alliance, "remote-ecg", alliance.ecg_center)
        consent_and_summary = supporting[:2]
        body = invitation(alliance, "remote-ecg", alliance.ecg_center, [*consent_and_summary, "Observation/no-such-ecg"])
        response = await alliance.township.call("POST", "ServiceRequest", body)
        assert response.status_code == 422, response.text
        assert issue(response)["expression"] == ["ServiceRequest.supportingInfo[2].reference"]
        assert "Observation/no-such-ecg" in issue(response)["diagnostics"]
        chain = await ids_found(alliance.township, "ServiceRequest", requisition=body["requisition"]["value"])
        assert chain == []


class TestReportRefusals:
    async def test_complete_refuses_a_report_of_the_wrong_type_or_about_another_patient(
            self, alliance: Alliance, api: Any) -> None:
        _, task, _ = await invite(alliance, "teleconsultation", alliance.county)
        consultant = await _practitioner_role(api, alliance.county.reference, "chief-physician", "cardiology")
        accepted = (await operate(alliance.county, task, "accept")).json()
        assigned = (await operate(alliance.county, accepted, "assign-practitioner",
                                  parameters(practitioner=consultant))).json()

        # A signed DiagnosticReport about the right patient: a remote reading's report, not a consult note.
        reading = await signed_report(alliance.county, alliance, consultant, kind="DiagnosticReport")
        wrong_type = await operate(alliance.county, assigned, "complete", parameters(output=reading))
        assert wrong_type.status_code == 422, wrong_type.text
        assert "DocumentReference or Composition" in diagnostics(wrong_type)
        assert issue(wrong_type)["expression"] == ["Task.output"]

        stranger = await api.post("Patient", {"resourceType": "Patient", "name": [{"family": "李"}]})
        someone_else = dataclasses.replace(alliance, patient=f"Patient/{stranger.json()['id']}")
        their_note = await signed_report(alliance.county, someone_else, consultant, kind="DocumentReference")
        wrong_patient = await operate(alliance.county, assigned, "complete", parameters(output=their_note))
        assert wrong_patient.status_code == 422, wrong_patient.text
        assert "not the Task's patient" in diagnostics(wrong_patient) and someone_else.patient in diagnostics(wrong_patient)

        missing = await operate(alliance.county, assigned, "complete", parameters(output="DocumentReference/no-such-note"))
        assert missing.status_code == 422, missing.text

        seen = (await alliance.township.call("GET", f"Task/{task['id']}")).json()
        assert seen["status"] == "accepted" and "output" not in seen
        note = await signed_report(alliance.county, alliance, consultant, kind="DocumentReference")
        done = await operate(alliance.county, assigned, "complete", parameters(output=note))
        assert done.status_code == 200, done.text  # the refusals were about the reports, nothing else

    async def test_a_remote_diagnosis_does_not_convert_into_a_referral(self, alliance: Alliance) -> None:
        request, task, supporting = await invite(alliance, "remote-ecg", alliance.ecg_center)
        accepted = (await operate(alliance.ecg_center, task, "accept")).json()
        assigned = (await operate(alliance.ecg_center, accepted, "assign-practitioner",
                                  parameters(practitioner=alliance.ecg_reader))).json()
        report = await signed_report(alliance.ecg_center, alliance, alliance.ecg_reader, results=[supporting[-1]])
        done = (await operate(alliance.ecg_center, assigned, "complete", parameters(output=report))).json()
        assert done["status"] == "completed", done

        refused = await operate(alliance.township, done, "convert-to-referral", parameters(reason="需来院"))
        assert refused.status_code == 422, refused.text
        assert issue(refused)["expression"] == ["Task.code"]
        assert "teleconsultation" in diagnostics(refused)
        seen = (await alliance.township.call("GET", f"Task/{task['id']}")).json()
        assert seen["meta"]["versionId"] == done["meta"]["versionId"]
        assert await ids_found(alliance.township, "ServiceRequest", **{"based-on": f"ServiceRequest/{request['id']}"}) == []


class TestSchedulingRefusals:
    async def test_an_appointment_outside_its_slot_or_without_the_inviting_party_is_422(
            self, alliance: Alliance, api: Any) -> None:
        request, slots = await invitation_with_slots(alliance)
        consultant = await _practitioner_role(api, alliance.county.reference, "chief-physician", "cardiology")

        too_long = appointment(alliance, request, slots[0], alliance.county, consultant)
        too_long["start"], too_long["end"] = "2030-06-01T14:00:00+08:00", "2030-06-01T14:45:00+08:00"
        response = await alliance.township.call("POST", "Appointment", too_long)
        assert response.status_code == 422, response.text
        assert issue(response)["expression"] == ["Appointment.start"] and slots[0] in diagnostics(response)

        no_inviting_party = appointment(alliance, request, slots[0], alliance.county, consultant)
        no_inviting_party["participant"] = [p for p in no_inviting_party["participant"]
                                            if p["actor"]["reference"] != alliance.township.reference]
        response = await alliance.county.call("POST", "Appointment/$book", no_inviting_party)
        assert response.status_code == 422, response.text
        assert "inviting party" in diagnostics(response) and alliance.township.reference in diagnostics(response)
        assert issue(response)["expression"] == ["Appointment.participant"]

        assert (await alliance.county.call("GET", slots[0])).json()["status"] == "free"
        assert await ids_found(alliance.township, "Appointment", slot=slots[0]) == []
        booked = await alliance.township.call("POST", "Appointment",
                                              appointment(alliance, request, slots[0], alliance.county, consultant))
        assert booked.status_code == 201, booked.text  # the refused ones held nothing

    async def test_a_booked_slot_cannot_be_deleted_until_its_appointment_is_cancelled(
            self, alliance: Alliance, api: Any) -> None:
        request, slots = await invitation_with_slots(alliance)
        consultant = await _practitioner_role(api, alliance.county.reference, "chief-physician", "cardiology")
        booked = await alliance.township.call("POST", "Appointment",
                                              appointment(alliance, request, slots[0], alliance.county, consultant))
        assert booked.status_code == 201, booked.text

        refused = await alliance.county.call("DELETE", slots[0])
        assert refused.status_code == 409, refused.text
        assert outcome_code(refused) == "conflict" and booked.json()["id"] in diagnostics(refused)
        assert (await alliance.county.call("GET", slots[0])).json()["status"] == "busy"

        cancelled = await alliance.township.call("PUT", f"Appointment/{booked.json()['id']}",
                                                 {**booked.json(), "status": "cancelled"})
        assert cancelled.status_code == 200, cancelled.text
        deleted = await alliance.county.call("DELETE", slots[0])
        assert deleted.status_code in (200, 204), deleted.text
        assert (await alliance.county.call("GET", slots[0])).status_code == 410

    async def test_find_needs_a_start_and_an_end(self, alliance: Alliance) -> None:
        for params in ({}, {"start": "2030-06-01T00:00:00+08:00"}, {"end": "2030-06-01T23:59:00+08:00"},
                       {"start": "2030-13-01", "end": "2030-06-02"}, {"start": "tomorrow", "end": "later"}):
            response = await alliance.township.call("GET", "Appointment/$find", params=params)
            assert response.status_code == 400, (params, response.text)
            assert outcome_code(response) == "invalid"
            assert "start and end" in diagnostics(response)


class TestSystemOperationRefusals:
    async def test_statistics_with_a_malformed_period_is_400(self, alliance: Alliance) -> None:
        for period in ("2026-13", "2026-02-30", "2026-1", "last month", ""):
            response = await alliance.county.call("GET", "$telemedicine-statistics", params={"period": period})
            assert response.status_code == 400, (period, response.text)
            assert outcome_code(response) == "invalid" and "period" in diagnostics(response)
        not_an_organization = await alliance.county.call("GET", "$telemedicine-statistics",
                                                         params={"period": "2026", "organization": "Patient/x"})
        assert not_an_organization.status_code == 400

    async def test_the_worklist_shows_each_caller_only_what_it_may_read(self, alliance: Alliance) -> None:
        """Anyone may ask for an owner's worklist; the answer is filtered like a search: the
        owner sees its work, an inviting party its own requests in it, a third party nothing."""
        _, mine, _ = await invite(alliance, "remote-ecg", alliance.ecg_center)
        owner = {"owner": alliance.ecg_center.reference, "code": "remote-diagnosis"}

        async def worklist(party: Party) -> list[str]:
            response = await party.call("GET", "$telemedicine-worklist", params=owner)
            assert response.status_code == 200, response.text
            return [e["resource"]["id"] for e in response.json()["entry"]]

        assert await worklist(alliance.ecg_center) == [mine["id"]]
        assert await worklist(alliance.township) == [mine["id"]]
        assert await worklist(alliance.other_township) == []
        for params in ({}, {"owner": "tmecg-center"}, {"owner": alliance.patient}):
            response = await alliance.ecg_center.call("GET", "$telemedicine-worklist", params=params)
            assert response.status_code == 400, (params, response.text)
            assert outcome_code(response) == "invalid"


class TestPrivacy:
    async def test_a_third_organization_sees_nothing_of_an_invitation_and_the_parties_see_it_all(
            self, alliance: Alliance, api: Any) -> None:
        request, slots = await invitation_with_slots(alliance)
        task = (await alliance.township.call("GET", "Task", params={"focus": f"ServiceRequest/{request['id']}",
                                                                        "code": "teleconsultation"}))
        task = task.json()["entry"][0]["resource"]
        consultant = await _practitioner_role(api, alliance.county.reference, "chief-physician", "cardiology")
        session = await alliance.township.call("POST", "Appointment",
                                               appointment(alliance, request, slots[0], alliance.county, consultant))
        assert session.status_code == 201, session.text
        accepted = (await operate(alliance.county, task, "accept")).json()
        assigned = (await operate(alliance.county, accepted, "assign-practitioner",
                                  parameters(practitioner=consultant))).json()
        note = await signed_report(alliance.county, alliance, consultant, kind="DocumentReference")
        assert (await operate(alliance.county, assigned, "complete", parameters(output=note))).status_code == 200

        records = [f"ServiceRequest/{request['id']}", f"Task/{task['id']}",
                   f"Appointment/{session.json()['id']}", note]
        searches: list[tuple[str, dict[str, str]]] = [
            ("ServiceRequest", {"requisition": request["requisition"]["value"]}),
            ("ServiceRequest", {"patient": alliance.patient, "category": f"{CATEGORY}|teleconsultation"}),
            ("Task", {"patient": alliance.patient}),
            ("Task", {"owner": alliance.county.reference, "code": "teleconsultation"}),
            ("Appointment", {"based-on": f"ServiceRequest/{request['id']}"}),
            ("Appointment", {"actor": alliance.county.reference}),
            ("Appointment", {"slot": slots[0]}),
            ("Provenance", {"target": f"Task/{task['id']}"}),
            ("Provenance", {"target": note}),
            ("DocumentReference", {"patient": alliance.patient}),
        ]
        for outsider in (alliance.other_township, alliance.province):
            for reference in records:
                response = await outsider.call("GET", reference)
                assert response.status_code == 404, (outsider.reference, reference, response.text)
                assert outcome_code(response) == "not-found"
            for path in (f"Task/{task['id']}/$available-actions", f"Task/{task['id']}/_history"):
                assert (await outsider.call("GET", path)).status_code == 404, path
            # Acting on it is 404 too, not 403: a 403 would tell it the Task exists.
            assert (await operate(outsider, assigned, "cancel", parameters(reason="x"))).status_code == 404
            for resource_type, params in searches:
                assert await ids_found(outsider, resource_type, **params) == [], (outsider.reference, resource_type, params)

        for party in (alliance.township, alliance.county):
            for reference in records:
                response = await party.call("GET", reference)
                assert response.status_code == 200, (party.reference, reference, response.text)
            # The report's signature (a Provenance) is read with the report: the inviting party
            # can check who signed what it reads.
            for resource_type, params in searches:
                assert await ids_found(party, resource_type, **params), (party.reference, resource_type, params)


class TestConcurrentUpdates:
    async def test_concurrent_transitions_with_one_if_match_leave_one_winner_and_one_provenance(
            self, alliance: Alliance) -> None:
        _, task, _ = await invite(alliance, "teleconsultation", alliance.county)
        moves = [("accept", None), ("accept", None), ("reject", parameters(reason="本院无专家排班")),
                 ("receive", None)]
        responses = await asyncio.gather(*(operate(alliance.county, task, name, body) for name, body in moves))
        statuses = [r.status_code for r in responses]
        assert sorted(statuses) == [200, 412, 412, 412], [r.text for r in responses]
        assert all(outcome_code(r) == "conflict" for r in responses if r.status_code == 412)
        winner = moves[statuses.index(200)][0]

        final = (await alliance.township.call("GET", f"Task/{task['id']}")).json()
        assert final["meta"]["versionId"] == "2"
        assert final["status"] == {"accept": "accepted", "reject": "rejected", "receive": "received"}[winner]
        provenance = await alliance.township.call("GET", "Provenance", params={"target": f"Task/{task['id']}"})
        assert [e["resource"]["activity"]["coding"][0]["code"] for e in provenance.json()["entry"]] == [winner]


# --- notifications ----------------------------------------------------------------------------

TOPIC = "teleconsult-status"
NOTIFIED_WITHIN = 30.0


@contextmanager
def receivers(count: int) -> Iterator[list[NotificationReceiver]]:
    started = [NotificationReceiver() for _ in range(count)]
    try:
        yield started
    finally:
        for receiver in started:
            receiver.stop()


async def eventually_true(what: str, check: Any) -> None:
    """Poll `check` without blocking the event loop the embedded system delivers from."""
    deadline = time.monotonic() + NOTIFIED_WITHIN
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {NOTIFIED_WITHIN}s")
        await asyncio.sleep(0.05)


def appointments_notified(receiver: NotificationReceiver) -> list[tuple[int, str, dict]]:
    """(event number, request method, the Appointment as written) of every Appointment event
    received, in event order. A bundle's entries after the status are its events' resources, in
    the same order."""
    found = []
    for body in list(receiver.bodies):
        status = status_of(body)
        if status["type"] != "event-notification":
            continue
        for event, entry in zip(status["notificationEvent"], body["entry"][1:], strict=True):
            if event["focus"]["reference"].split("/fhir/")[-1].startswith("Appointment/"):
                found.append((int(event["eventNumber"]), entry["request"]["method"], entry["resource"]))
    return sorted(found, key=lambda event: event[0])


class TestNotifications:
    async def test_booking_moving_and_cancelling_a_session_notifies_both_parties_and_no_one_else(
            self, alliance: Alliance, api: Any) -> None:
        request, slots = await invitation_with_slots(alliance)
        consultant = await _practitioner_role(api, alliance.county.reference, "chief-physician", "cardiology")
        county = alliance.county.reference
        with receivers(3) as (township_hook, county_hook, outsider_hook):
            subscribers = [
                (alliance.township, township_hook, f"Appointment?requester={alliance.township.reference}"),
                (alliance.county, county_hook, f"Appointment?owner={county}"),
                # Asks for the county hospital's sessions, but may read none of this one.
                (alliance.other_township, outsider_hook, f"Appointment?owner={county}"),
            ]
            created = []
            for party, hook, criteria in subscribers:
                response = await party.call("POST", "Subscription", subscription(
                    hook.url, topic=TOPIC, filters=(criteria,), content="full-resource"))
                assert response.status_code == 201, response.text
                created.append((party, response.json()["id"]))
            try:
                for _, hook, _ in subscribers:
                    await eventually_true("the handshake", lambda hook=hook: hook.statuses("handshake"))

                booked = await alliance.township.call("POST", "Appointment/$book", {
                    "resourceType": "Parameters", "parameter": [{"name": "appt-resource", "resource": appointment(
                        alliance, request, slots[0], alliance.county, consultant)}]})
                assert booked.status_code == 200, booked.text
                session = booked.json()["entry"][0]["resource"]
                moved = {k: v for k, v in session.items() if k not in ("start", "end")}
                moved["slot"] = [{"reference": slots[1]}]
                moved_response = await alliance.county.call("PUT", f"Appointment/{session['id']}", moved)
                assert moved_response.status_code == 200, moved_response.text
                cancelled = await alliance.township.call("PUT", f"Appointment/{session['id']}",
                                                         {**moved_response.json(), "status": "cancelled"})
                assert cancelled.status_code == 200, cancelled.text

                for hook in (township_hook, county_hook):
                    await eventually_true("three session notifications",
                                          lambda hook=hook: len(appointments_notified(hook)) >= 3)
                await asyncio.sleep(0.5)  # time for a wrong or duplicate delivery to show up

                for hook in (township_hook, county_hook):
                    events = appointments_notified(hook)
                    assert [number for number, _, _ in events] == [1, 2, 3]
                    assert {written["id"] for _, _, written in events} == {session["id"]}
                    assert [(method, w["status"], w["slot"][0]["reference"]) for _, method, w in events] == [
                        ("POST", "booked", slots[0]), ("PUT", "booked", slots[1]), ("PUT", "cancelled", slots[1])]
                    assert all(status_of(b)["topic"].endswith(f"/SubscriptionTopic/{TOPIC}")
                               for b in hook.bodies)
                assert outsider_hook.statuses("event-notification") == []
                assert session["id"] not in str(outsider_hook.bodies)
            finally:
                for party, subscription_id in created:
                    await party.call("DELETE", f"Subscription/{subscription_id}")

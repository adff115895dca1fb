"""The directory through the gateway: organization tree rules, master patient index, $match, $ihe-pix, $merge."""

import asyncio
import os
import random
import uuid
from pathlib import Path

import pytest

from directory.identifiers import (
    FACILITY_LEVEL_SYSTEM,
    NATIONAL_ID_SYSTEM,
    mrn_system,
    national_id_check_char,
)
from tests.support import outcome_code

MATCH_GRADE = "http://hl7.org/fhir/StructureDefinition/match-grade"


def national_id(birth: str = "19800101", sequence: int | None = None) -> str:
    seq = sequence if sequence is not None else random.randint(100, 999)
    first17 = f"330829{birth}{seq:03d}"
    return first17 + national_id_check_char(first17)


def organization(level: str, parent: str | None = None, name: str = "机构") -> dict:
    org = {
        "resourceType": "Organization",
        "id": f"org-{uuid.uuid4().hex[:10]}",
        "name": name,
        "type": [{"coding": [{"system": FACILITY_LEVEL_SYSTEM, "code": level}]}],
    }
    if parent:
        org["partOf"] = {"reference": f"Organization/{parent}"}
    return org


async def put(api, resource: dict):
    return await api.put(f"{resource['resourceType']}/{resource['id']}", resource)


async def tree(api) -> dict[str, dict]:
    """province ← city ← county ← township ← village, plus an ECG center under the county."""
    province = organization("provincial-hospital", name="省医院")
    city = organization("city-hospital", province["id"], "市医院")
    county = organization("county-hospital", city["id"], "县医院")
    township = organization("township-health-center", county["id"], "镇卫生院")
    village = organization("village-clinic", township["id"], "村卫生室")
    ecg = organization("ecg-center", county["id"], "心电诊断中心")
    nodes = {"province": province, "city": city, "county": county, "township": township, "village": village, "ecg": ecg}
    for node in nodes.values():
        response = await put(api, node)
        assert response.status_code == 201, response.text
    return nodes


class TestOrganizationTree:
    async def test_a_sensible_tree_is_accepted(self, api) -> None:
        nodes = await tree(api)
        found = await api.get("Organization", params={"partof": f"Organization/{nodes['county']['id']}"})
        assert {e["resource"]["id"] for e in found.json()["entry"]} == {nodes["township"]["id"], nodes["ecg"]["id"]}
        by_type = await api.get("Organization", params={"type": f"{FACILITY_LEVEL_SYSTEM}|village-clinic",
                                                        "_id": nodes["village"]["id"]})
        assert by_type.json()["total"] == 1

    async def test_a_county_hospital_under_a_township_is_refused(self, api) -> None:
        nodes = await tree(api)
        wrong = organization("county-hospital", nodes["township"]["id"])
        response = await put(api, wrong)
        assert response.status_code == 422
        assert outcome_code(response) == "business-rule"
        assert "township-health-center" in response.json()["issue"][0]["diagnostics"]
        assert (await api.get(f"Organization/{wrong['id']}")).status_code == 404

    async def test_a_cycle_is_refused(self, api) -> None:
        nodes = await tree(api)
        # Plain organizations (no facility level) may nest freely, but never in a circle.
        a = {"resourceType": "Organization", "id": f"plain-{uuid.uuid4().hex[:8]}", "name": "A"}
        b = {"resourceType": "Organization", "id": f"plain-{uuid.uuid4().hex[:8]}", "name": "B",
             "partOf": {"reference": f"Organization/{a['id']}"}}
        assert (await put(api, a)).status_code == 201
        assert (await put(api, b)).status_code == 201
        cycle = await put(api, {**a, "partOf": {"reference": f"Organization/{b['id']}"}})
        assert cycle.status_code == 422
        assert "cycle" in cycle.json()["issue"][0]["diagnostics"]
        itself = await put(api, {**a, "partOf": {"reference": f"Organization/{a['id']}"}})
        assert itself.status_code == 422
        assert nodes  # the coded tree is untouched

    async def test_an_unknown_parent_is_refused(self, api) -> None:
        orphan = organization("township-health-center", "no-such-county")
        response = await put(api, orphan)
        assert response.status_code == 422
        assert "Organization/no-such-county" in response.json()["issue"][0]["diagnostics"]

    async def test_a_village_clinic_needs_a_parent_and_an_unknown_level_is_refused(self, api) -> None:
        response = await put(api, organization("village-clinic"))
        assert response.status_code == 422
        unknown = await put(api, organization("space-station"))
        assert unknown.status_code == 400
        assert "space-station" in unknown.json()["issue"][0]["diagnostics"]

    async def test_a_parent_cannot_change_into_a_level_its_children_do_not_fit(self, api) -> None:
        nodes = await tree(api)
        township = nodes["township"]
        demoted = {**township, "type": [{"coding": [{"system": FACILITY_LEVEL_SYSTEM, "code": "village-clinic"}]}]}
        response = await put(api, demoted)
        assert response.status_code == 422
        deleted = await api.delete(f"Organization/{township['id']}")
        assert deleted.status_code == 422  # it still has a village clinic under it

    @pytest.mark.parametrize("modifier", ["below", "above"])
    async def test_hierarchy_search(self, api, modifier: str) -> None:
        nodes = await tree(api)
        if modifier == "below":
            response = await api.get("Organization", params={"partof:below": f"Organization/{nodes['city']['id']}"})
            expected = {nodes[k]["id"] for k in ("county", "township", "village", "ecg")}
        else:
            response = await api.get("Organization", params={"partof:above": f"Organization/{nodes['village']['id']}"})
            expected = {nodes[k]["id"] for k in ("township", "county", "city", "province")}
        assert response.status_code == 200, response.text
        assert {e["resource"]["id"] for e in response.json().get("entry", [])} == expected


def patient(nid: str | None = None, *, family: str = "王", given: str = "芳", birth: str = "1980-01-01",
            gender: str = "female", phone: str | None = None, mrn: tuple[str, str] | None = None) -> dict:
    body: dict = {"resourceType": "Patient", "name": [{"family": family, "given": [given]}],
                  "gender": gender, "birthDate": birth, "identifier": []}
    if nid:
        body["identifier"].append({"system": NATIONAL_ID_SYSTEM, "value": nid})
    if mrn:
        body["identifier"].append({"system": mrn_system(mrn[0]), "value": mrn[1]})
    if phone:
        body["telecom"] = [{"system": "phone", "value": phone}]
    if not body["identifier"]:
        del body["identifier"]
    return body


class TestMasterPatientIndex:
    async def test_a_wrong_check_digit_is_400(self, api) -> None:
        good = national_id()
        bad = good[:-1] + ("0" if good[-1] != "0" else "1")
        response = await api.post("Patient", patient(bad))
        assert response.status_code == 400
        assert response.json()["issue"][0]["expression"] == ["Patient.identifier[0].value"]

    async def test_a_second_patient_with_the_same_national_id_is_409_naming_the_first(self, api) -> None:
        nid = national_id("19750505")
        first = await api.post("Patient", patient(nid))
        assert first.status_code == 201
        second = await api.post("Patient", patient(nid, given="芳芳"))
        assert second.status_code == 409
        assert outcome_code(second) == "duplicate"
        assert f"Patient/{first.json()['id']}" in second.json()["issue"][0]["diagnostics"]
        assert nid not in second.text  # the national ID is masked in the message
        found = await api.get("Patient", params={"identifier": f"{NATIONAL_ID_SYSTEM}|{nid}"})
        assert found.json()["total"] == 1

    async def test_conditional_create_returns_the_existing_patient(self, api) -> None:
        nid = national_id("19600606")
        first = await api.post("Patient", patient(nid))
        again = await api.post("Patient", patient(nid), headers={"If-None-Exist": f"identifier={NATIONAL_ID_SYSTEM}|{nid}"})
        assert again.status_code == 200
        assert again.json()["id"] == first.json()["id"]

    async def test_concurrent_registrations_of_one_person_create_one_patient(self, api) -> None:
        nid = national_id("19900909")
        responses = await asyncio.gather(*(api.post("Patient", patient(nid)) for _ in range(4)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(201) == 1 and set(statuses) <= {201, 409}, statuses
        found = await api.get("Patient", params={"identifier": f"{NATIONAL_ID_SYSTEM}|{nid}"})
        assert found.json()["total"] == 1

    async def test_each_hospital_mrn_is_an_identifier_of_its_own_system(self, api) -> None:
        hospital = f"hosp-{uuid.uuid4().hex[:6]}"
        created = await api.post("Patient", patient(national_id("19700707"), mrn=(hospital, "MR0001")))
        found = await api.get("Patient", params={"identifier": f"{mrn_system(hospital)}|MR0001"})
        assert [e["resource"]["id"] for e in found.json()["entry"]] == [created.json()["id"]]


class TestMatch:
    async def test_sure_matches_come_first_with_grades(self, api) -> None:
        family = f"欧阳{uuid.uuid4().hex[:4]}"
        nid = national_id("19851212")
        exact = (await api.post("Patient", patient(nid, family=family, given="娜", birth="1985-12-12", phone="13800001111"))).json()
        similar = (await api.post("Patient", patient(None, family=family, given="娜", birth="1985-12-12", phone="13800001111"))).json()
        namesake = (await api.post("Patient", patient(None, family=family, given="娜", birth="1990-01-01"))).json()
        query = patient(nid, family=family, given="娜", birth="1985-12-12", phone="13800001111")
        response = await api.post("Patient/$match", {"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": query}]})
        assert response.status_code == 200, response.text
        entries = response.json()["entry"]
        ids = [e["resource"]["id"] for e in entries]
        grades = [e["search"]["extension"][0]["valueCode"] for e in entries]
        scores = [e["search"]["score"] for e in entries]
        assert ids[0] == exact["id"] and grades[0] == "certain"
        assert ids.index(similar["id"]) < ids.index(namesake["id"])
        assert scores == sorted(scores, reverse=True)
        assert dict(zip(ids, grades))[similar["id"]] == "probable"
        certain_only = await api.post("Patient/$match", {"resourceType": "Parameters", "parameter": [
            {"name": "resource", "resource": query}, {"name": "onlyCertainMatches", "valueBoolean": True}]})
        assert [e["resource"]["id"] for e in certain_only.json()["entry"]] == [exact["id"]]

    async def test_match_without_a_patient_is_400(self, api) -> None:
        response = await api.post("Patient/$match", {"resourceType": "Parameters", "parameter": []})
        assert response.status_code == 400


class TestPixAndMerge:
    async def test_ihe_pix_gives_the_other_identifiers(self, api) -> None:
        hospital = f"hosp-{uuid.uuid4().hex[:6]}"
        nid = national_id("19550505")
        created = (await api.post("Patient", patient(nid, mrn=(hospital, "A-77")))).json()
        response = await api.get("Patient/$ihe-pix", params={"sourceIdentifier": f"{mrn_system(hospital)}|A-77"})
        assert response.status_code == 200
        parameters = response.json()["parameter"]
        assert {"name": "targetIdentifier", "valueIdentifier": {"system": NATIONAL_ID_SYSTEM, "value": nid}} in parameters
        assert {"name": "targetId", "valueReference": {"reference": f"Patient/{created['id']}"}} in parameters
        unknown = await api.get("Patient/$ihe-pix", params={"sourceIdentifier": "urn:nowhere|0"})
        assert unknown.status_code == 404

    async def test_merge_keeps_every_identifier_findable_and_loses_nothing(self, api) -> None:
        county, township = f"county-{uuid.uuid4().hex[:6]}", f"town-{uuid.uuid4().hex[:6]}"
        nid = national_id("19450303")
        target = (await api.post("Patient", patient(nid, mrn=(county, "C-1")))).json()
        source = (await api.post("Patient", patient(None, mrn=(township, "T-9"), phone="13911112222"))).json()
        response = await api.post("Patient/$merge", {"resourceType": "Parameters", "parameter": [
            {"name": "source-patient", "valueReference": {"reference": f"Patient/{source['id']}"}},
            {"name": "target-patient", "valueReference": {"reference": f"Patient/{target['id']}"}}]})
        assert response.status_code == 200, response.text
        merged = (await api.get(f"Patient/{target['id']}")).json()
        systems = {i["system"] for i in merged["identifier"]}
        assert {NATIONAL_ID_SYSTEM, mrn_system(county), mrn_system(township)} <= systems
        assert merged["telecom"][0]["value"] == "13911112222"
        retired = (await api.get(f"Patient/{source['id']}")).json()
        assert retired["active"] is False
        assert retired["link"] == [{"other": {"reference": f"Patient/{target['id']}"}, "type": "replaced-by"}]
        by_old_mrn = await api.get("Patient/$ihe-pix", params={"sourceIdentifier": f"{mrn_system(township)}|T-9"})
        assert {"name": "targetId", "valueReference": {"reference": f"Patient/{target['id']}"}} in by_old_mrn.json()["parameter"]
        found = await api.get("Patient", params={"identifier": f"{mrn_system(township)}|T-9", "active:not": "false"})
        assert [e["resource"]["id"] for e in found.json()["entry"]] == [target["id"]]

    async def test_merging_two_people_is_refused(self, api) -> None:
        a = (await api.post("Patient", patient(national_id("19300101")))).json()
        b = (await api.post("Patient", patient(national_id("19300202")))).json()
        response = await api.post("Patient/$merge", {"resourceType": "Parameters", "parameter": [
            {"name": "source-patient", "valueReference": {"reference": f"Patient/{a['id']}"}},
            {"name": "target-patient", "valueReference": {"reference": f"Patient/{b['id']}"}}]})
        assert response.status_code == 422
        assert (await api.get(f"Patient/{a['id']}")).json().get("active") is not False


class TestDirectoryLoad:
    async def test_loading_twice_changes_nothing_and_a_change_updates_only_it(self, system, tmp_path: Path) -> None:
        from directory.directory_file import parse_directory_text
        from directory.load import load_directory
        from servicekit.peers import SYSTEM_IDENTITY

        gateway = system.state.gateway
        suffix = uuid.uuid4().hex[:6]
        text = f"""
alliance: 测试医共体
organizations:
  - id: city-{suffix}
    name: 测试市医院
    level: city-hospital
    uscc: "{_uscc()}"
  - id: county-{suffix}
    name: 测试县医院
    level: county-hospital
    parent: city-{suffix}
    uscc: "{_uscc()}"
"""

        async def send(body: bytes) -> tuple[int, bytes]:
            upstream = await gateway.send("directory", "POST", "/fhir", identity=SYSTEM_IDENTITY,
                                          headers={"content-type": "application/fhir+json"}, content=body)
            return upstream.status, upstream.content

        first = await load_directory(parse_directory_text(text, "a.yaml"), send)
        again = await load_directory(parse_directory_text(text, "a.yaml"), send)
        changed = await load_directory(parse_directory_text(text.replace("测试县医院", "测试县人民医院"), "a.yaml"), send)
        assert (first.created, again.created, again.updated) == (2, 0, 0)
        assert (changed.updated, changed.unchanged) == (1, 1)


def _uscc() -> str:
    from directory.identifiers import USCC_ALPHABET, uscc_check_char

    first17 = "12330829" + "".join(random.choice("0123456789") for _ in range(9))
    assert all(c in USCC_ALPHABET for c in first17)
    return first17 + uscc_check_char(first17)


def test_national_id_generator_is_valid() -> None:
    from directory.identifiers import is_valid_national_id

    assert is_valid_national_id(national_id())
    assert os.environ.get("PYTEST_CURRENT_TEST")


class TestReferencesResolvedThroughTheDirectory:
    @pytest.mark.parametrize("field,reference", [
        ("subject", "Patient/nobody-{}"),
        ("performer", "Organization/nowhere-{}"),
        ("requester", "Practitioner/no-one-{}"),
    ])
    async def test_other_services_refuse_references_the_directory_does_not_know(self, api, field, reference) -> None:
        known_patient = (await api.post("Patient", patient(None))).json()
        missing = reference.format(uuid.uuid4().hex[:6])
        request = {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
                   "subject": {"reference": f"Patient/{known_patient['id']}"}}
        request[field] = [{"reference": missing}] if field == "performer" else {"reference": missing}
        response = await api.post("ServiceRequest", request)
        assert response.status_code == 422
        assert missing in response.json()["issue"][0]["diagnostics"]
        without_missing = {k: v for k, v in request.items() if k != field}
        without_missing["subject"] = {"reference": f"Patient/{known_patient['id']}"}
        ok = await api.post("ServiceRequest", without_missing)
        assert ok.status_code == 201


class TestDirectoryLoadErrors:
    async def test_a_server_refusal_names_the_file_line(self, system, api) -> None:
        from directory.directory_file import parse_directory_text
        from directory.load import DirectoryLoadError, load_directory
        from servicekit.peers import SYSTEM_IDENTITY

        nid = national_id("19660606")
        await api.post("Patient", patient(nid))
        text = f"""alliance: 测试
organizations:
  - id: cnty-{uuid.uuid4().hex[:6]}
    name: 县医院
    level: county-hospital
    uscc: "{_uscc()}"
patients:
  - id: dup-{uuid.uuid4().hex[:6]}
    name: 王芳
    gender: {"female" if int(nid[16]) % 2 == 0 else "male"}
    birth_date: "1966-06-06"
    national_id: "{nid}"
"""
        gateway = system.state.gateway

        async def send(body: bytes) -> tuple[int, bytes]:
            upstream = await gateway.send("directory", "POST", "/fhir", identity=SYSTEM_IDENTITY,
                                          headers={"content-type": "application/fhir+json"}, content=body)
            return upstream.status, upstream.content

        with pytest.raises(DirectoryLoadError) as refused:
            await load_directory(parse_directory_text(text, "alliance.yaml"), send)
        assert str(refused.value).startswith("alliance.yaml:8:")
        assert "already has national ID" in str(refused.value)

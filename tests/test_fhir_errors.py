"""Every bad input gets the right 4xx and an OperationOutcome naming the problem; never a 500,
never a partial write (ARCHITECTURE.md §3, errors)."""

import uuid
from typing import Any

import pytest

from tests.support import outcome_code


def new_system() -> str:
    return f"urn:test:{uuid.uuid4().hex}"


async def count(api: Any, query: str) -> int:
    response = await api.get(f"{query}&_summary=count")
    assert response.status_code == 200, response.text
    return response.json()["total"]


def diagnostics(response: Any) -> str:
    return " ".join(issue.get("diagnostics", "") for issue in response.json()["issue"])


def raw_patient(system: str, body: str) -> bytes:
    return ('{"resourceType":"Patient","identifier":[{"system":"' + system + '","value":"1"}]' + body + "}").encode()


async def test_malformed_json_is_400_and_writes_nothing(api):
    system = new_system()
    for body in (raw_patient(system, ',"active":tru'), raw_patient(system, ",")[:-5], b"{", b"not json"):
        response = await api.post("Patient", body)
        assert response.status_code == 400, body
        assert outcome_code(response) == "invalid" and "JSON" in diagnostics(response)
    assert await count(api, f"Patient?identifier={system}|") == 0


async def test_body_that_is_not_a_resource_is_400(api):
    for body in (b"[]", b"null", b"42", b'"Patient"', b"{}", b'{"resourceType":7}', b""):
        response = await api.post("Patient", body)
        assert response.status_code == 400, body
        assert outcome_code(response) == "invalid"


async def test_wrong_resource_type_is_400(api):
    system = new_system()
    body = {"resourceType": "Practitioner", "identifier": [{"system": system, "value": "1"}]}
    created = await api.post("Patient", body)
    assert created.status_code == 400 and outcome_code(created) == "invalid"
    assert "Practitioner" in diagnostics(created)
    updated = await api.put("Patient/abc", {**body, "id": "abc"})
    assert updated.status_code == 400
    unknown = await api.post("Patient", {"resourceType": "Spaceship"})
    assert unknown.status_code == 400
    assert await count(api, f"Practitioner?identifier={system}|") == 0
    assert await count(api, f"Patient?identifier={system}|") == 0


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ({"colour": "red"}, "Patient.colour"),  # unknown element
        ({"active": "yes"}, "Patient.active"),  # a string where a boolean belongs
        ({"multipleBirthInteger": "2"}, "Patient.multipleBirthInteger"),
        ({"birthDate": "1990-13-45"}, "Patient.birthDate"),
        ({"gender": "robot"}, "Patient.gender"),
        ({"name": {"family": "王"}}, "Patient.name"),  # an object where an array belongs
        ({"name": [{"family": 5}]}, "Patient.name"),
        ({"contact": [{"name": {"family": "x"}, "gender": True}]}, "Patient.contact"),
    ],
)
async def test_invalid_resource_is_400_naming_the_element(api, extra, where):
    system = new_system()
    response = await api.post("Patient", {"resourceType": "Patient", "identifier": [{"system": system, "value": "1"}],
                                          **extra})
    assert response.status_code == 400, response.text
    issue = response.json()["issue"][0]
    assert issue["severity"] == "error" and issue["code"] in ("structure", "value", "required", "invalid", "code-invalid")
    assert any(e.startswith(where) for e in issue.get("expression", [])) or where in issue["diagnostics"]
    assert await count(api, f"Patient?identifier={system}|") == 0


async def test_invalid_update_keeps_previous_version(api):
    system = new_system()
    created = await api.post("Patient", {"resourceType": "Patient", "identifier": [{"system": system, "value": "1"}]})
    pid = created.headers["location"].split("/")[-3]
    response = await api.put(f"Patient/{pid}", {"resourceType": "Patient", "id": pid, "active": "no"})
    assert response.status_code == 400
    read = (await api.get(f"Patient/{pid}")).json()
    assert read["meta"]["versionId"] == "1" and "active" not in read


async def test_quantity_value_as_string_is_refused(api):
    system = new_system()
    response = await api.post("Observation", {
        "resourceType": "Observation", "identifier": [{"system": system, "value": "1"}], "status": "final",
        "code": {"text": "x"}, "valueQuantity": {"value": "1.5", "unit": "mg"},
    })
    assert response.status_code == 400
    assert "Observation.valueQuantity.value" in diagnostics(response)
    assert await count(api, f"Observation?identifier={system}|") == 0


async def test_unknown_search_parameter_is_400_unless_lenient(api):
    system = new_system()
    await api.post("Patient", {"resourceType": "Patient", "identifier": [{"system": system, "value": "1"}]})
    strict = await api.get(f"Patient?identifier={system}|&familyname=wang")
    assert strict.status_code == 400 and outcome_code(strict) == "not-supported"
    assert "familyname" in diagnostics(strict)
    lenient = await api.get(f"Patient?identifier={system}|&familyname=wang", headers={"Prefer": "handling=lenient"})
    assert lenient.status_code == 200
    bundle = lenient.json()
    assert bundle["total"] == 1
    notes = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert notes and "familyname" in notes[0]["issue"][0]["diagnostics"]
    strict_again = await api.get(f"Patient?identifier={system}|&familyname=wang", headers={"Prefer": "handling=strict"})
    assert strict_again.status_code == 400


async def test_reference_to_missing_resource_of_held_type_is_422(api):
    system = new_system()
    missing = f"missing-{uuid.uuid4().hex[:10]}"
    same_service = await api.post("Patient", {
        "resourceType": "Patient", "identifier": [{"system": system, "value": "1"}],
        "managingOrganization": {"reference": f"Organization/{missing}"},
    })
    assert same_service.status_code == 422 and outcome_code(same_service) == "processing"
    assert f"Organization/{missing}" in diagnostics(same_service)
    other_service = await api.post("Observation", {
        "resourceType": "Observation", "identifier": [{"system": system, "value": "1"}], "status": "final",
        "code": {"text": "x"}, "subject": {"reference": f"Patient/{missing}"},
    })
    assert other_service.status_code == 422 and f"Patient/{missing}" in diagnostics(other_service)
    # A type the product does not hold is kept as it is.
    not_held = await api.post("Observation", {
        "resourceType": "Observation", "identifier": [{"system": system, "value": "2"}], "status": "final",
        "code": {"text": "x"}, "subject": {"reference": f"Group/{missing}"},
    })
    assert not_held.status_code == 201
    assert await count(api, f"Patient?identifier={system}|") == 0
    assert await count(api, f"Observation?identifier={system}|") == 1


async def test_reference_to_deleted_resource_is_422(api):
    org = await api.post("Organization", {"resourceType": "Organization", "name": "gone"})
    org_id = org.headers["location"].split("/")[-3]
    await api.delete(f"Organization/{org_id}")
    response = await api.post("Patient", {"resourceType": "Patient",
                                          "managingOrganization": {"reference": f"Organization/{org_id}"}})
    assert response.status_code == 422


async def test_id_mismatch_between_url_and_body_is_400(api):
    pid = f"p-{uuid.uuid4().hex[:10]}"
    mismatch = await api.put(f"Patient/{pid}", {"resourceType": "Patient", "id": "something-else"})
    assert mismatch.status_code == 400 and outcome_code(mismatch) == "invalid"
    no_id = await api.put(f"Patient/{pid}", {"resourceType": "Patient"})
    assert no_id.status_code == 400
    number_id = await api.put(f"Patient/{pid}", {"resourceType": "Patient", "id": 5})
    assert number_id.status_code == 400
    assert (await api.get(f"Patient/{pid}")).status_code == 404


async def test_unsupported_and_unknown_types_are_404_not_supported(api):
    for path in ("Medication/1", "Medication", "Spaceship/1", "Spaceship"):
        response = await api.get(path)
        assert response.status_code == 404, path
        assert outcome_code(response) == "not-supported"
    posted = await api.post("Medication", {"resourceType": "Medication"})
    assert posted.status_code == 404 and outcome_code(posted) == "not-supported"


async def test_version_conflict_is_412(api):
    created = await api.post("Patient", {"resourceType": "Patient"})
    pid = created.headers["location"].split("/")[-3]
    await api.put(f"Patient/{pid}", {"resourceType": "Patient", "id": pid, "active": True})
    stale = await api.put(f"Patient/{pid}", {"resourceType": "Patient", "id": pid, "active": False},
                          headers={"If-Match": 'W/"1"'})
    assert stale.status_code == 412 and outcome_code(stale) == "conflict"
    bad_etag = await api.put(f"Patient/{pid}", {"resourceType": "Patient", "id": pid}, headers={"If-Match": "abc"})
    assert bad_etag.status_code == 400
    assert (await api.get(f"Patient/{pid}")).json()["active"] is True


@pytest.mark.parametrize("bad_id", ["bad_id", "a" * 65, "%E4%B8%AD", "a%20b", "a:b"])
async def test_invalid_id_in_path_is_400(api, bad_id):
    for method in ("GET", "PUT", "DELETE"):
        body = {"resourceType": "Patient", "id": bad_id} if method == "PUT" else None
        response = await api.request(method, f"Patient/{bad_id}", body)
        assert response.status_code == 400, (method, bad_id, response.text)
        assert outcome_code(response) == "invalid"


async def test_huge_body_is_413(api):
    system = new_system()
    padding = "x" * (17 * 1024 * 1024)
    response = await api.post("Patient", raw_patient(system, ',"name":[{"text":"' + padding + '"}]'))
    assert response.status_code == 413 and outcome_code(response) == "too-costly"
    assert await count(api, f"Patient?identifier={system}|") == 0


async def test_deeply_nested_body_is_400(api):
    system = new_system()
    for depth in (100, 5000):
        nested = '"extension":' + '[{"url":"x","extension":' * depth + "[]" + "}]" * depth
        response = await api.post("Patient", raw_patient(system, "," + nested))
        assert response.status_code == 400, depth
        assert outcome_code(response) == "invalid"
    assert await count(api, f"Patient?identifier={system}|") == 0


async def test_invalid_utf8_is_400(api):
    system = new_system()
    response = await api.post("Patient", raw_patient(system, ',"name":[{"family":"\xff\xfe"}]').replace(
        "\xff\xfe".encode(), b"\xff\xfe"))
    assert response.status_code == 400 and outcome_code(response) == "invalid"
    surrogate = await api.post("Patient", raw_patient(system, ',"name":[{"family":"\\ud800"}]'))
    assert surrogate.status_code == 400
    assert await count(api, f"Patient?identifier={system}|") == 0


async def test_unsupported_content_type_and_method(api):
    xml = await api.post("Patient", b"<Patient xmlns='http://hl7.org/fhir'/>",
                         headers={"Content-Type": "application/fhir+xml"})
    assert xml.status_code == 415 and outcome_code(xml) == "not-supported"
    post_instance = await api.post("Patient/abc", {"resourceType": "Patient"})
    assert post_instance.status_code == 405
    patch_xml = await api.patch("Patient/abc", b"<x/>", headers={"Content-Type": "application/xml"})
    assert patch_xml.status_code in (404, 415)


@pytest.mark.parametrize(
    "path",
    [
        "Patient?_count=-1", "Patient?_sort=-", "Patient?_include=Nothing", "Patient?_include=Patient:nothing",
        "Patient?birthdate=xx2020", "Patient?_lastUpdated=gt2020-99", "Patient?identifier:below=x",
        "Patient?_has:Nothing:patient:code=x", "Patient?_has:Patient", "Patient?general-practitioner.nothing=x",
        "Patient?_cursor=%%%", "Patient?_summary=maybe", "Patient?_total=always", "Patient/x/_history/abc",
        "Patient?organization:below=Location/1", "Observation?value-quantity=big", "Patient?_id:above=x",
        "Patient/_history?_count=x&_since=whenever",
    ],
)
async def test_odd_queries_never_500(api, path):
    response = await api.get(path)
    assert 400 <= response.status_code < 500, (path, response.text)
    assert response.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(
    "body",
    [
        {"resourceType": "Patient", "meta": "x"},
        {"resourceType": "Patient", "meta": {"versionId": 3}},
        {"resourceType": "Patient", "meta": {"lastUpdated": "yesterday"}},
        {"resourceType": "Patient", "identifier": "x"},
        {"resourceType": "Patient", "managingOrganization": {"reference": 5}},
        {"resourceType": "Patient", "managingOrganization": "Organization/1"},
        {"resourceType": "Patient", "extension": [{"url": 1}]},
        {"resourceType": "Patient", "contained": [{"resourceType": "Nothing"}]},
        {"resourceType": "Patient", "contained": ["x"]},
        {"resourceType": "Patient", "_birthDate": "x"},
        {"resourceType": "Patient", "name": [None]},
        {"resourceType": "Patient", "birthDate": None},
        {"resourceType": "Patient", "\u0000": 1},
    ],
)
async def test_odd_bodies_never_500(api, body):
    response = await api.post("Patient", body)
    assert 400 <= response.status_code < 500, (body, response.text)
    assert response.json()["resourceType"] == "OperationOutcome"


async def test_odd_patches_never_500(api):
    created = await api.post("Patient", {"resourceType": "Patient"})
    pid = created.headers["location"].split("/")[-3]
    attempts = [
        ([{"op": "replace", "path": "/id", "value": "other"}], "application/json-patch+json"),
        ([{"op": "remove", "path": "/resourceType"}], "application/json-patch+json"),
        ([{"op": "fly", "path": "/x"}], "application/json-patch+json"),
        ({"op": "add"}, "application/json-patch+json"),
        ([{"op": "add", "path": "/meta/versionId", "value": "9"}], "application/json-patch+json"),
        ({"resourceType": "Parameters", "parameter": [{"name": "operation"}]}, "application/fhir+json"),
        ({"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
            {"name": "type", "valueCode": "delete"}, {"name": "path", "valueString": "Patient.("}]}]},
         "application/fhir+json"),
        ({"resourceType": 3}, "application/merge-patch+json"),
        ([1, 2], "application/merge-patch+json"),
    ]
    for body, content_type in attempts:
        response = await api.patch(f"Patient/{pid}", body, headers={"Content-Type": content_type})
        assert 400 <= response.status_code < 500 or response.status_code == 200, (body, response.text)
        assert response.json()["resourceType"] in ("OperationOutcome", "Patient")
    read = (await api.get(f"Patient/{pid}")).json()
    assert read["id"] == pid and read["resourceType"] == "Patient"


@pytest.mark.parametrize(
    "bundle",
    [
        {"resourceType": "Bundle", "type": "transaction", "entry": "x"},
        {"resourceType": "Bundle", "type": "transaction", "entry": [None]},
        {"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {"method": "POST", "url": "Patient"}}]},
        {"resourceType": "Bundle", "type": "transaction",
         "entry": [{"request": {"method": "POST", "url": "Patient"}, "resource": "x"}]},
        {"resourceType": "Bundle", "type": "transaction",
         "entry": [{"request": {"method": "PUT", "url": "Patient"}, "resource": {"resourceType": "Patient"}}]},
        {"resourceType": "Bundle", "type": "transaction",
         "entry": [{"request": {"method": "GET", "url": "Patient?_count=x"}}]},
        {"resourceType": "Bundle", "type": "transaction",
         "entry": [{"request": {"method": "POST", "url": "Patient", "ifNoneExist": "nothing=1"},
                    "resource": {"resourceType": "Patient"}}]},
        {"resourceType": "Bundle", "type": "transaction",
         "entry": [{"request": {"method": "DELETE", "url": "Patient?nothing=1"}}]},
        {"resourceType": "Bundle", "type": "transaction",
         "entry": [{"request": {"method": "PATCH", "url": "Patient/x"}, "resource": {"resourceType": "Binary",
                                                                                     "data": "!!"}}]},
        {"resourceType": "Bundle", "type": "transaction",
         "entry": [{"request": {"method": "POST", "url": "Patient", "ifMatch": "zz"},
                    "resource": {"resourceType": "Patient"}}]},
        {"resourceType": "Bundle", "type": "transaction",
         "entry": [{"fullUrl": 5, "request": {"method": "POST", "url": "Patient"}, "resource": {"resourceType": "Patient"}}]},
        {"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "GET", "url": 5}}]},
        {"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {"method": "GET", "url": "/"}}]},
    ],
)
async def test_odd_bundles_never_500(api, bundle):
    response = await api.post("", bundle)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.json()["resourceType"] == "OperationOutcome"

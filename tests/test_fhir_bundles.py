"""`batch` and `transaction` Bundles through the gateway (https://hl7.org/fhir/R4/http.html#transaction).

A transaction is all-or-nothing inside one service (the gateway refuses one that spans services);
a batch runs each entry on its own. Every test checks what was (not) written afterwards.
"""

import base64
import uuid
from typing import Any

import orjson

from tests.support import outcome_code


def new_system() -> str:
    return f"urn:test:{uuid.uuid4().hex}"


def urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


async def count(api: Any, query: str) -> int:
    response = await api.get(f"{query}&_summary=count")
    assert response.status_code == 200, response.text
    return response.json()["total"]


def entry(method: str, url: str, resource: dict[str, Any] | None = None, full_url: str | None = None,
          **request: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"request": {"method": method, "url": url, **request}}
    if resource is not None:
        item["resource"] = resource
    if full_url is not None:
        item["fullUrl"] = full_url
    return item


def bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def ident(system: str, value: str) -> list[dict[str, str]]:
    return [{"system": system, "value": value}]


def reference_of(response_entry: dict[str, Any]) -> str:
    """`Type/id` from an entry's `response.location` (`Type/id/_history/v`)."""
    return "/".join(response_entry["response"]["location"].split("/")[:2])


async def test_transaction_rewrites_urn_uuid_references(api):
    system = new_system()
    org, doctor = urn(), urn()
    sent = bundle(
        "transaction",
        entry("POST", "Patient", {"resourceType": "Patient", "identifier": ident(system, "p"),
                                  "managingOrganization": {"reference": org},
                                  "generalPractitioner": [{"reference": doctor}]}, urn()),
        entry("POST", "Organization", {"resourceType": "Organization", "identifier": ident(system, "o"),
                                       "name": "溪口镇卫生院"}, org),
        entry("POST", "Practitioner", {"resourceType": "Practitioner", "identifier": ident(system, "d")}, doctor),
        entry("POST", "PractitionerRole", {"resourceType": "PractitionerRole",
                                           "practitioner": {"reference": doctor},
                                           "organization": {"reference": org}}, urn()),
    )
    response = await api.post("", sent)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["type"] == "transaction-response" and len(result["entry"]) == 4
    assert all(e["response"]["status"].startswith("201") for e in result["entry"])
    assert all(e["response"]["etag"] == 'W/"1"' for e in result["entry"])
    patient_ref, org_ref, doctor_ref, role_ref = (reference_of(e) for e in result["entry"])
    assert patient_ref.startswith("Patient/") and org_ref.startswith("Organization/")
    patient = (await api.get(patient_ref)).json()
    assert patient["managingOrganization"] == {"reference": org_ref}
    assert patient["generalPractitioner"] == [{"reference": doctor_ref}]
    role = (await api.get(role_ref)).json()
    assert role["practitioner"]["reference"] == doctor_ref and role["organization"]["reference"] == org_ref
    assert await count(api, f"PractitionerRole?organization={org_ref}") == 1


async def test_transaction_references_between_entries_in_any_order(api):
    system = new_system()
    org_id, patient_id = f"o-{uuid.uuid4().hex[:10]}", f"p-{uuid.uuid4().hex[:10]}"
    sent = bundle(
        "transaction",
        entry("PUT", f"Patient/{patient_id}", {"resourceType": "Patient", "id": patient_id,
                                               "identifier": ident(system, "p"),
                                               "managingOrganization": {"reference": f"Organization/{org_id}"}}),
        entry("PUT", f"Organization/{org_id}", {"resourceType": "Organization", "id": org_id, "name": "x"}),
    )
    response = await api.post("", sent)
    assert response.status_code == 200, response.text
    assert [e["response"]["status"][:3] for e in response.json()["entry"]] == ["201", "201"]
    assert (await api.get(f"Patient/{patient_id}")).json()["managingOrganization"]["reference"] == f"Organization/{org_id}"


async def test_transaction_unresolved_urn_uuid_is_refused(api):
    system = new_system()
    sent = bundle("transaction", entry("POST", "Patient", {
        "resourceType": "Patient", "identifier": ident(system, "p"), "managingOrganization": {"reference": urn()},
    }))
    response = await api.post("", sent)
    assert response.status_code in (400, 422) and response.json()["resourceType"] == "OperationOutcome"
    assert await count(api, f"Patient?identifier={system}|") == 0


async def test_transaction_conditional_entries(api):
    system = new_system()
    existing = await api.post("Organization", {"resourceType": "Organization", "identifier": ident(system, "hospital")})
    hospital = "Organization/" + existing.headers["location"].split("/")[-3]
    old_patient = await api.post("Patient", {"resourceType": "Patient", "identifier": ident(system, "old")})
    old_ref = "Patient/" + old_patient.headers["location"].split("/")[-3]
    sent = bundle(
        "transaction",
        # conditional create that matches: nothing written, the existing one reported
        entry("POST", "Organization", {"resourceType": "Organization", "identifier": ident(system, "hospital"),
                                       "name": "changed"}, urn(), ifNoneExist=f"identifier={system}|hospital"),
        # conditional create that does not match: created
        entry("POST", "Patient", {"resourceType": "Patient", "identifier": ident(system, "new"),
                                  "managingOrganization": {"reference": f"Organization?identifier={system}|hospital"}},
              urn(), ifNoneExist=f"identifier={system}|new"),
        # conditional update of an existing one
        entry("PUT", f"Patient?identifier={system}|old", {"resourceType": "Patient", "identifier": ident(system, "old"),
                                                           "gender": "female"}),
    )
    response = await api.post("", sent)
    assert response.status_code == 200, response.text
    matched, created, updated = response.json()["entry"]
    assert matched["response"]["status"].startswith("200") and reference_of(matched) == hospital
    assert created["response"]["status"].startswith("201")
    assert updated["response"]["status"].startswith("200") and reference_of(updated) == old_ref
    assert (await api.get(hospital)).json().get("name") is None
    new_patient = (await api.get(reference_of(created))).json()
    assert new_patient["managingOrganization"] == {"reference": hospital}  # conditional reference resolved
    assert (await api.get(old_ref)).json()["gender"] == "female"
    assert await count(api, f"Organization?identifier={system}|") == 1
    again = await api.post("", sent)  # the same transaction again changes nothing new
    assert [e["response"]["status"][:3] for e in again.json()["entry"]] == ["200", "200", "200"]
    assert await count(api, f"Patient?identifier={system}|") == 2


async def test_transaction_conditional_reference_must_match_exactly_one(api):
    system = new_system()
    sent = bundle("transaction", entry("POST", "Patient", {
        "resourceType": "Patient", "identifier": ident(system, "p"),
        "managingOrganization": {"reference": f"Organization?identifier={system}|nothing"},
    }, urn()))
    response = await api.post("", sent)
    assert response.status_code in (400, 412, 422) and response.json()["resourceType"] == "OperationOutcome"
    assert await count(api, f"Patient?identifier={system}|") == 0


async def test_transaction_is_all_or_nothing(api):
    system = new_system()
    existing = await api.post("Patient", {"resourceType": "Patient", "identifier": ident(system, "keep")})
    keep = "Patient/" + existing.headers["location"].split("/")[-3]
    sent = bundle(
        "transaction",
        entry("POST", "Patient", {"resourceType": "Patient", "identifier": ident(system, "1")}, urn()),
        entry("PUT", keep, {"resourceType": "Patient", "id": keep.split("/")[1], "identifier": ident(system, "keep"),
                            "gender": "male"}),
        entry("DELETE", keep.replace("Patient", "Patient") + "-nope"),
        entry("POST", "Patient", {"resourceType": "Patient", "identifier": ident(system, "3"), "colour": "red"}, urn()),
    )
    response = await api.post("", sent)
    assert response.status_code == 400 and outcome_code(response) in ("structure", "invalid")
    assert "entry[3]" in response.text
    assert await count(api, f"Patient?identifier={system}|") == 1
    kept = (await api.get(keep)).json()
    assert kept["meta"]["versionId"] == "1" and "gender" not in kept
    broken_reference = bundle(
        "transaction",
        entry("POST", "Patient", {"resourceType": "Patient", "identifier": ident(system, "4")}, urn()),
        entry("POST", "Patient", {"resourceType": "Patient", "identifier": ident(system, "5"),
                                  "managingOrganization": {"reference": f"Organization/missing-{uuid.uuid4().hex[:8]}"}},
              urn()),
    )
    response = await api.post("", broken_reference)
    assert response.status_code == 422 and outcome_code(response) == "processing"
    assert await count(api, f"Patient?identifier={system}|") == 1


async def test_transaction_spanning_services_commits_every_piece(api):
    # Patient (directory) and Observation (results-sharing): split by the gateway, both stored,
    # the Observation's urn:uuid subject rewritten to the Patient's id (gateway/cross_transaction.py).
    system = new_system()
    patient = urn()
    sent = bundle(
        "transaction",
        entry("POST", "Patient", {"resourceType": "Patient", "identifier": ident(system, "p")}, patient),
        entry("POST", "Observation", {"resourceType": "Observation", "identifier": ident(system, "o"),
                                      "status": "final", "code": {"text": "x"},
                                      "subject": {"reference": patient}}, urn()),
    )
    response = await api.post("", sent)
    assert response.status_code == 200, response.text
    entries = response.json()["entry"]
    assert [e["response"]["status"][:3] for e in entries] == ["201", "201"]
    patient_id = entries[0]["response"]["location"].split("/")[1]
    observation = await api.get(entries[1]["response"]["location"].split("/_history")[0])
    assert observation.json()["subject"]["reference"] == f"Patient/{patient_id}"
    assert await count(api, f"Patient?identifier={system}|") == 1


async def test_transaction_processes_deletes_creates_updates_then_reads(api):
    system = new_system()
    doomed = await api.post("Patient", {"resourceType": "Patient", "identifier": ident(system, "doomed")})
    doomed_ref = "Patient/" + doomed.headers["location"].split("/")[-3]
    patched = await api.post("Patient", {"resourceType": "Patient", "identifier": ident(system, "patched")})
    patched_ref = "Patient/" + patched.headers["location"].split("/")[-3]
    json_patch = [{"op": "add", "path": "/active", "value": True}]
    sent = bundle(
        "transaction",
        entry("GET", f"Patient?identifier={system}|"),  # runs last: sees the transaction's own writes
        entry("POST", "Patient", {"resourceType": "Patient", "identifier": ident(system, "created")}, urn()),
        entry("PATCH", patched_ref, {"resourceType": "Binary", "contentType": "application/json-patch+json",
                                     "data": base64.b64encode(orjson.dumps(json_patch)).decode()}),
        entry("DELETE", doomed_ref),
    )
    response = await api.post("", sent)
    assert response.status_code == 200, response.text
    search, created, patch, deletion = response.json()["entry"]
    found = {e["resource"]["identifier"][0]["value"] for e in search["resource"].get("entry", [])}
    assert found == {"created", "patched"}
    assert created["response"]["status"].startswith("201")
    assert patch["response"]["status"].startswith("200")
    assert deletion["response"]["status"][:3] in ("200", "204")
    assert (await api.get(patched_ref)).json()["active"] is True
    assert (await api.get(doomed_ref)).status_code == 410


async def test_batch_entries_succeed_or_fail_on_their_own(api):
    system = new_system()
    existing = await api.post("Patient", {"resourceType": "Patient", "identifier": ident(system, "e")})
    existing_ref = "Patient/" + existing.headers["location"].split("/")[-3]
    sent = bundle(
        "batch",
        entry("POST", "Patient", {"resourceType": "Patient", "identifier": ident(system, "ok")}),
        entry("POST", "Patient", {"resourceType": "Patient", "identifier": ident(system, "bad"), "colour": "red"}),
        entry("GET", existing_ref),
        entry("GET", f"Patient?identifier={system}|e"),
        entry("PUT", existing_ref, {"resourceType": "Patient", "id": "other-id"}),
        entry("GET", "Patient/definitely-not-there"),
    )
    response = await api.post("", sent)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["type"] == "batch-response"
    statuses = [e["response"]["status"][:3] for e in result["entry"]]
    assert statuses == ["201", "400", "200", "200", "400", "404"]
    assert result["entry"][1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert result["entry"][2]["resource"]["id"] == existing_ref.split("/")[1]
    assert result["entry"][3]["resource"]["total"] == 1
    assert await count(api, f"Patient?identifier={system}|") == 2  # "ok" and "e"; "bad" not written


async def test_batch_conditional_entries_and_no_links_between_entries(api):
    system = new_system()
    existing = await api.post("Patient", {"resourceType": "Patient", "identifier": ident(system, "e")})
    existing_id = existing.headers["location"].split("/")[-3]
    sent = bundle(
        "batch",
        entry("POST", "Patient", {"resourceType": "Patient", "identifier": ident(system, "e")},
              ifNoneExist=f"identifier={system}|e"),
        entry("PUT", f"Patient?identifier={system}|e", {"resourceType": "Patient", "identifier": ident(system, "e"),
                                                        "gender": "male"}),
        entry("POST", "Patient", {"resourceType": "Patient", "identifier": ident(system, "n"),
                                  "managingOrganization": {"reference": urn()}}),
    )
    response = await api.post("", sent)
    assert response.status_code == 200, response.text
    matched, updated, linked = response.json()["entry"]
    assert matched["response"]["status"].startswith("200") and existing_id in matched["response"]["location"]
    assert updated["response"]["status"].startswith("200") and existing_id in updated["response"]["location"]
    assert linked["response"]["status"].startswith("422")
    assert (await api.get(f"Patient/{existing_id}")).json()["gender"] == "male"
    assert await count(api, f"Patient?identifier={system}|") == 1


async def test_batch_spanning_services(api):
    system = new_system()
    sent = bundle(
        "batch",
        entry("POST", "Patient", {"resourceType": "Patient", "identifier": ident(system, "p")}),
        entry("POST", "Observation", {"resourceType": "Observation", "identifier": ident(system, "o"),
                                      "status": "final", "code": {"text": "x"}}),
    )
    response = await api.post("", sent)
    assert response.status_code == 200, response.text
    assert [e["response"]["status"][:3] for e in response.json()["entry"]] == ["201", "201"]
    assert await count(api, f"Patient?identifier={system}|") == 1
    assert await count(api, f"Observation?identifier={system}|") == 1


async def test_bundle_of_other_type_posted_to_base_is_400(api):
    response = await api.post("", {"resourceType": "Bundle", "type": "collection", "entry": []})
    assert response.status_code == 400 and outcome_code(response) == "invalid"

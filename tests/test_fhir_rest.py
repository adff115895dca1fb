"""FHIR RESTful interactions through the gateway (https://hl7.org/fhir/R4/http.html).

One test per behaviour; each asserts what a bug would break: status, `Location`/`ETag`/
`Last-Modified`, the body, the OperationOutcome's issue code, and that a refused request wrote
nothing. Data carry a per-test identifier system so tests can share the session's databases.
"""

import asyncio
import uuid
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.support import outcome_code

BASE = "http://127.0.0.1:8080/fhir"
JSON_PATCH = {"Content-Type": "application/json-patch+json"}
MERGE_PATCH = {"Content-Type": "application/merge-patch+json"}


def new_system() -> str:
    return f"urn:test:{uuid.uuid4().hex}"


def patient(system: str, value: str = "1", **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": system, "value": value}],
        "name": [{"family": "王", "given": ["芳"]}],
        **extra,
    }


def location_id(response: Any) -> str:
    """The id in `Location: {base}/Type/id/_history/v`."""
    parts = response.headers["location"].split("/")
    assert parts[-2] == "_history", response.headers["location"]
    return parts[-3]


async def count(api: Any, query: str) -> int:
    response = await api.get(f"{query}&_summary=count" if "?" in query else f"{query}?_summary=count")
    assert response.status_code == 200, response.text
    return response.json()["total"]


def without_server_meta(resource: dict[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in (resource.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
    rest = {k: v for k, v in resource.items() if k not in ("meta", "id")}
    return {**rest, "meta": meta} if meta else rest


# --------------------------------------------------------------------------------------- read


async def test_read_returns_stored_resource_with_etag_and_last_modified(api):
    created = await api.post("Patient", patient(new_system(), birthDate="1980-05-01"))
    assert created.status_code == 201
    pid = location_id(created)
    response = await api.get(f"Patient/{pid}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/fhir+json")
    assert response.headers["etag"] == 'W/"1"'
    body = response.json()
    assert body["id"] == pid and body["meta"]["versionId"] == "1"
    assert body["birthDate"] == "1980-05-01"
    # Last-Modified is meta.lastUpdated at second precision.
    modified = parsedate_to_datetime(response.headers["last-modified"])
    assert body["meta"]["lastUpdated"].startswith(modified.strftime("%Y-%m-%dT%H:%M:%S"))


async def test_read_and_search_serve_the_stored_bytes(api, monkeypatch):
    """Reads and search bundles splice the stored JSON; no model is built on the read path."""
    system = new_system()
    raw = (b'{"resourceType":"Observation","valueQuantity":{"value":7.10,"unit":"mmol/L"},"status":"final",'
           b'"code":{"text":"glucose"},"identifier":[{"system":"' + system.encode() + b'","value":"1"}]}')
    oid = location_id(await api.post("Observation", raw))
    first = await api.get(f"Observation/{oid}")

    def no_models(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the read path built a model")

    from fhirkit import resources

    monkeypatch.setattr(resources, "validate", no_models)
    monkeypatch.setattr(resources, "model_class", no_models)
    again = await api.get(f"Observation/{oid}")
    bundle = await api.get(f"Observation?identifier={system}|1")
    assert again.content == first.content
    assert b'"resource":' + first.content in bundle.content
    # The client's element order and decimal text survive (a model dump would reorder and reformat).
    assert first.content.index(b'"valueQuantity"') < first.content.index(b'"status"')
    assert b'"value":7.10' in first.content


async def test_read_of_unknown_id_is_404_not_found(api):
    response = await api.get(f"Patient/nope-{uuid.uuid4().hex[:12]}")
    assert response.status_code == 404
    assert outcome_code(response) == "not-found"


async def test_vread_returns_each_version(api):
    system = new_system()
    created = await api.post("Patient", patient(system, gender="male"))
    pid = location_id(created)
    updated = await api.put(f"Patient/{pid}", {**patient(system, gender="female"), "id": pid})
    assert updated.status_code == 200 and updated.headers["etag"] == 'W/"2"'
    first = await api.get(f"Patient/{pid}/_history/1")
    second = await api.get(f"Patient/{pid}/_history/2")
    assert first.status_code == second.status_code == 200
    assert (first.json()["gender"], first.json()["meta"]["versionId"]) == ("male", "1")
    assert (second.json()["gender"], second.json()["meta"]["versionId"]) == ("female", "2")
    assert first.headers["etag"] == 'W/"1"'
    missing = await api.get(f"Patient/{pid}/_history/3")
    assert missing.status_code == 404 and outcome_code(missing) == "not-found"


# ------------------------------------------------------------------------------------- create


async def test_create_assigns_server_id_and_ignores_body_id(api):
    system = new_system()
    client_id = f"client-{uuid.uuid4().hex[:10]}"
    response = await api.post("Patient", {**patient(system), "id": client_id})
    assert response.status_code == 201
    pid = location_id(response)
    assert pid != client_id
    assert response.headers["location"] == f"{BASE}/Patient/{pid}/_history/1"
    assert response.headers["etag"] == 'W/"1"' and "last-modified" in response.headers
    body = response.json()
    assert body["id"] == pid and body["meta"]["versionId"] == "1"
    assert (await api.get(f"Patient/{client_id}")).status_code == 404
    assert await count(api, f"Patient?identifier={system}|1") == 1


async def test_create_keeps_client_content_and_meta_exactly(api):
    system = new_system()
    sent = {
        "resourceType": "Observation",
        "meta": {"profile": ["http://example.org/StructureDefinition/x"], "tag": [{"code": "t1"}],
                 "versionId": "99", "lastUpdated": "2001-01-01T00:00:00Z"},
        "identifier": [{"system": system, "value": "1"}],
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]},
        "effectiveDateTime": "2024-03-01T08:30:00.715+08:00",
        "valueQuantity": {"value": 5.50, "unit": "mmol/L"},
    }
    raw = (
        b'{"resourceType":"Observation","meta":{"profile":["http://example.org/StructureDefinition/x"],'
        b'"tag":[{"code":"t1"}],"versionId":"99","lastUpdated":"2001-01-01T00:00:00Z"},'
        b'"identifier":[{"system":"' + system.encode() + b'","value":"1"}],"status":"final",'
        b'"code":{"coding":[{"system":"http://loinc.org","code":"2339-0"}]},'
        b'"effectiveDateTime":"2024-03-01T08:30:00.715+08:00","valueQuantity":{"value":5.50,"unit":"mmol/L"}}'
    )
    response = await api.post("Observation", raw)
    assert response.status_code == 201
    read = await api.get(f"Observation/{location_id(response)}")
    assert b'"value":5.50' in read.content  # decimal precision is part of the value
    assert b'"effectiveDateTime":"2024-03-01T08:30:00.715+08:00"' in read.content
    body = read.json()
    assert body["meta"]["versionId"] == "1" and body["meta"]["lastUpdated"] != "2001-01-01T00:00:00Z"
    assert without_server_meta(body) == without_server_meta(sent)


# ------------------------------------------------------------------------------------- update


async def test_update_creates_new_version(api):
    system = new_system()
    pid = location_id(await api.post("Patient", patient(system)))
    response = await api.put(f"Patient/{pid}", {**patient(system, active=True), "id": pid})
    assert response.status_code == 200
    assert response.headers["etag"] == 'W/"2"'
    assert response.headers["location"] == f"{BASE}/Patient/{pid}/_history/2"
    assert response.json()["active"] is True
    assert (await api.get(f"Patient/{pid}")).json()["meta"]["versionId"] == "2"


async def test_update_as_create_with_client_id(api):
    pid = f"client-{uuid.uuid4().hex[:12]}"
    response = await api.put(f"Patient/{pid}", {**patient(new_system()), "id": pid})
    assert response.status_code == 201
    assert response.headers["location"] == f"{BASE}/Patient/{pid}/_history/1"
    assert response.json()["id"] == pid
    read = await api.get(f"Patient/{pid}")
    assert read.status_code == 200 and read.headers["etag"] == 'W/"1"'


# ------------------------------------------------------------------------- conditional create


async def test_conditional_create_with_if_none_exist(api):
    system = new_system()
    criteria = {"If-None-Exist": f"identifier={system}|1"}
    first = await api.post("Patient", patient(system), headers=criteria)
    assert first.status_code == 201
    again = await api.post("Patient", patient(system, gender="male"), headers=criteria)
    assert again.status_code == 200  # matched: nothing created, the existing one returned
    assert location_id(again) == location_id(first)
    assert "gender" not in again.json()
    assert await count(api, f"Patient?identifier={system}|1") == 1
    await api.post("Patient", patient(system, value="2"))
    await api.post("Patient", patient(system, value="3"))
    several = await api.post("Patient", patient(system, value="4"), headers={"If-None-Exist": f"identifier={system}|"})
    assert several.status_code == 412 and outcome_code(several) == "multiple-matches"
    assert await count(api, f"Patient?identifier={system}|") == 3


async def test_conditional_create_fhirpy_style_query_string(api):
    system = new_system()
    first = await api.post(f"Patient?identifier={system}|1", patient(system))
    assert first.status_code == 201
    again = await api.post(f"Patient?identifier={system}|1", patient(system))
    assert again.status_code == 200 and location_id(again) == location_id(first)
    assert await count(api, f"Patient?identifier={system}|1") == 1


# --------------------------------------------------------------------- conditional update/delete


async def test_conditional_update_no_match_creates(api):
    system = new_system()
    response = await api.put(f"Patient?identifier={system}|1", patient(system))
    assert response.status_code == 201
    assert await count(api, f"Patient?identifier={system}|1") == 1


async def test_conditional_update_one_match_updates_it(api):
    system = new_system()
    pid = location_id(await api.post("Patient", patient(system)))
    response = await api.put(f"Patient?identifier={system}|1", patient(system, gender="other"))
    assert response.status_code == 200
    assert location_id(response) == pid and response.headers["etag"] == 'W/"2"'
    assert (await api.get(f"Patient/{pid}")).json()["gender"] == "other"


async def test_conditional_update_several_matches_is_412_and_writes_nothing(api):
    system = new_system()
    ids = [location_id(await api.post("Patient", patient(system, value=v))) for v in ("1", "2")]
    response = await api.put(f"Patient?identifier={system}|", patient(system, gender="male"))
    assert response.status_code == 412 and outcome_code(response) == "multiple-matches"
    for pid in ids:
        assert (await api.get(f"Patient/{pid}")).json()["meta"]["versionId"] == "1"
    assert await count(api, f"Patient?identifier={system}|") == 2


async def test_conditional_delete_zero_one_many(api):
    system = new_system()
    nothing = await api.delete(f"Patient?identifier={system}|0")
    assert nothing.status_code in (200, 204)
    pid = location_id(await api.post("Patient", patient(system, value="1")))
    one = await api.delete(f"Patient?identifier={system}|1")
    assert one.status_code in (200, 204)
    assert (await api.get(f"Patient/{pid}")).status_code == 410
    ids = [location_id(await api.post("Patient", patient(system, value=v))) for v in ("2", "3")]
    many = await api.delete(f"Patient?identifier={system}|")
    assert many.status_code == 412 and outcome_code(many) == "multiple-matches"
    for other in ids:
        assert (await api.get(f"Patient/{other}")).status_code == 200


async def test_criteria_without_search_parameters_never_match_everything(api):
    system = new_system()
    first = await api.post("Patient?_format=json", patient(system))
    second = await api.post("Patient?_format=json", patient(system))
    assert first.status_code == second.status_code == 201  # plain creates, not conditional ones
    assert location_id(first) != location_id(second)
    for method in ("PUT", "DELETE"):
        for query in ("_format=json", "_count=1", "_sort=birthdate"):
            body = patient(system) if method == "PUT" else None
            response = await api.request(method, f"Patient?{query}", body)
            assert response.status_code == 400 and outcome_code(response) == "invalid", (method, query)
    if_none_exist = await api.post("Patient", patient(system), headers={"If-None-Exist": "_count=1"})
    assert if_none_exist.status_code == 400
    assert await count(api, f"Patient?identifier={system}|1") == 2
    for pid in (location_id(first), location_id(second)):
        assert (await api.get(f"Patient/{pid}")).json()["meta"]["versionId"] == "1"


# -------------------------------------------------------------------------------------- patch


async def test_json_patch(api):
    system = new_system()
    pid = location_id(await api.post("Patient", patient(system)))
    operations = [
        {"op": "add", "path": "/gender", "value": "female"},
        {"op": "replace", "path": "/name/0/family", "value": "李"},
    ]
    response = await api.patch(f"Patient/{pid}", operations, headers=JSON_PATCH)
    assert response.status_code == 200, response.text
    assert response.headers["etag"] == 'W/"2"'
    body = response.json()
    assert (body["gender"], body["name"][0]["family"], body["meta"]["versionId"]) == ("female", "李", "2")
    assert await count(api, f"Patient?identifier={system}|1&family=李") == 1  # re-indexed


async def test_json_patch_that_fails_writes_nothing(api):
    pid = location_id(await api.post("Patient", patient(new_system())))
    failing = [{"op": "add", "path": "/gender", "value": "male"}, {"op": "test", "path": "/active", "value": True}]
    response = await api.patch(f"Patient/{pid}", failing, headers=JSON_PATCH)
    assert response.status_code in (400, 422)
    assert response.json()["resourceType"] == "OperationOutcome"
    read = (await api.get(f"Patient/{pid}")).json()
    assert read["meta"]["versionId"] == "1" and "gender" not in read
    invalid = await api.patch(f"Patient/{pid}", [{"op": "add", "path": "/gender", "value": 7}], headers=JSON_PATCH)
    assert invalid.status_code == 400 and outcome_code(invalid) in ("invalid", "value", "structure")
    assert (await api.get(f"Patient/{pid}")).json()["meta"]["versionId"] == "1"


async def test_fhirpath_patch(api):
    system = new_system()
    pid = location_id(await api.post("Patient", patient(system, birthDate="1970-01-01")))
    parameters = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "operation", "part": [
                {"name": "type", "valueCode": "replace"},
                {"name": "path", "valueString": "Patient.birthDate"},
                {"name": "value", "valueDate": "1971-02-02"},
            ]},
            {"name": "operation", "part": [
                {"name": "type", "valueCode": "add"},
                {"name": "path", "valueString": "Patient"},
                {"name": "name", "valueString": "active"},
                {"name": "value", "valueBoolean": True},
            ]},
        ],
    }
    response = await api.patch(f"Patient/{pid}", parameters)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["birthDate"], body["active"], body["meta"]["versionId"]) == ("1971-02-02", True, "2")
    assert await count(api, f"Patient?identifier={system}|1&birthdate=1971-02-02") == 1


async def test_merge_patch(api):
    pid = location_id(await api.post("Patient", patient(new_system(), gender="male", active=True)))
    response = await api.patch(f"Patient/{pid}", {"gender": "female", "active": None}, headers=MERGE_PATCH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["gender"] == "female" and "active" not in body and body["meta"]["versionId"] == "2"


async def test_patch_with_stale_if_match_is_412(api):
    system = new_system()
    pid = location_id(await api.post("Patient", patient(system)))
    await api.put(f"Patient/{pid}", {**patient(system, active=True), "id": pid})
    response = await api.patch(
        f"Patient/{pid}", [{"op": "add", "path": "/gender", "value": "male"}],
        headers={**JSON_PATCH, "If-Match": 'W/"1"'},
    )
    assert response.status_code == 412 and outcome_code(response) == "conflict"
    assert (await api.get(f"Patient/{pid}")).json()["meta"]["versionId"] == "2"


# ------------------------------------------------------------------------------------- delete


async def test_delete_then_read_is_410_and_history_shows_deletion(api):
    system = new_system()
    pid = location_id(await api.post("Patient", patient(system)))
    response = await api.delete(f"Patient/{pid}")
    assert response.status_code in (200, 204)
    gone = await api.get(f"Patient/{pid}")
    assert gone.status_code == 410 and outcome_code(gone) == "deleted"
    assert await count(api, f"Patient?identifier={system}|1") == 0
    history = (await api.get(f"Patient/{pid}/_history")).json()
    assert history["type"] == "history" and len(history["entry"]) == 2
    deletion, creation = history["entry"]
    assert deletion["request"] == {"method": "DELETE", "url": f"Patient/{pid}"}
    assert deletion["response"]["status"].startswith("410") and "resource" not in deletion
    assert creation["request"]["method"] == "POST" and creation["resource"]["id"] == pid
    assert (await api.get(f"Patient/{pid}/_history/1")).status_code == 200  # old versions stay readable
    revived = await api.put(f"Patient/{pid}", {**patient(system), "id": pid})
    assert revived.status_code == 201 and revived.headers["etag"] == 'W/"3"'


# ------------------------------------------------------------------------------------ history


async def test_instance_history_with_count_and_since(api):
    system = new_system()
    pid = location_id(await api.post("Patient", patient(system)))
    for gender in ("male", "female", "other"):
        await api.put(f"Patient/{pid}", {**patient(system, gender=gender), "id": pid})
    page = (await api.get(f"Patient/{pid}/_history?_count=3")).json()
    assert [e["resource"]["meta"]["versionId"] for e in page["entry"]] == ["4", "3", "2"]
    next_url = next(link["url"] for link in page["link"] if link["relation"] == "next")
    rest = (await api.get(next_url.split("/fhir/", 1)[1])).json()
    assert [e["resource"]["meta"]["versionId"] for e in rest["entry"]] == ["1"]
    assert not any(link["relation"] == "next" for link in rest["link"])
    third = (await api.get(f"Patient/{pid}/_history/3")).json()["meta"]["lastUpdated"]
    since = (await api.get(f"Patient/{pid}/_history?_since={third}")).json()
    assert [e["resource"]["meta"]["versionId"] for e in since["entry"]] == ["4", "3"]


async def test_history_at_gives_the_versions_current_then(api):
    system = new_system()
    pid = location_id(await api.post("Patient", patient(system)))
    for gender in ("male", "female"):
        await asyncio.sleep(0.005)
        await api.put(f"Patient/{pid}", {**patient(system, gender=gender), "id": pid})
    stamps = [(await api.get(f"Patient/{pid}/_history/{v}")).json()["meta"]["lastUpdated"] for v in (1, 2, 3)]
    # lastUpdated is shown to the millisecond: one millisecond later, only that version is current.
    just_after = [(datetime.fromisoformat(t.replace("Z", "+00:00")) + timedelta(milliseconds=1))
                  .isoformat(timespec="milliseconds") for t in stamps]

    async def versions_at(at: str, path: str = f"Patient/{pid}") -> list[str]:
        answer = (await api.get(f"{path}/_history?" + urlencode({"_at": at, "_count": 1000}))).json()
        # (a deletion's entry has no resource)
        return [e["resource"]["meta"]["versionId"] for e in answer.get("entry", [])
                if e.get("resource", {}).get("id") == pid]

    for at, expected in ((just_after[0], ["1"]), (just_after[1], ["2"]), (just_after[2], ["3"]),
                         ("2999-01-01", ["3"]), ("1999-01-01", []), (stamps[0][:4], ["3", "2", "1"])):
        assert await versions_at(at) == expected, at
    assert await versions_at(just_after[1], "Patient") == ["2"]  # type level too
    assert (await api.get(f"Patient/{pid}/_history?_at=yesterday")).status_code == 400


async def test_type_history_with_count_and_since(api):
    system = new_system()
    first = location_id(await api.post("Practitioner", {"resourceType": "Practitioner",
                                                        "identifier": [{"system": system, "value": "1"}]}))
    stamp = (await api.get(f"Practitioner/{first}")).json()["meta"]["lastUpdated"]
    await asyncio.sleep(0.002)
    ids = [location_id(await api.post("Practitioner", {"resourceType": "Practitioner",
                                                       "identifier": [{"system": system, "value": v}]}))
           for v in ("2", "3")]
    since = (await api.get(f"Practitioner/_history?_since={stamp}")).json()
    seen = [e["resource"]["id"] for e in since["entry"]]
    assert seen[:2] == ids[::-1] and seen[2] == first
    page = (await api.get(f"Practitioner/_history?_since={stamp}&_count=1")).json()
    assert len(page["entry"]) == 1 and any(link["relation"] == "next" for link in page["link"])
    for bad_query in ("_since=yesterday", "_count=ten", "_at=soon", "_sort=_id"):
        bad = await api.get(f"Practitioner/_history?{bad_query}")
        assert bad.status_code == 400 and outcome_code(bad) == "invalid", bad_query


# ------------------------------------------------------------------------- optimistic locking


async def test_update_with_stale_if_match_is_412_and_writes_nothing(api):
    system = new_system()
    pid = location_id(await api.post("Patient", patient(system)))
    ok = await api.put(f"Patient/{pid}", {**patient(system, gender="male"), "id": pid}, headers={"If-Match": 'W/"1"'})
    assert ok.status_code == 200 and ok.headers["etag"] == 'W/"2"'
    stale = await api.put(f"Patient/{pid}", {**patient(system, gender="female"), "id": pid},
                          headers={"If-Match": 'W/"1"'})
    assert stale.status_code == 412 and outcome_code(stale) == "conflict"
    read = (await api.get(f"Patient/{pid}")).json()
    assert (read["gender"], read["meta"]["versionId"]) == ("male", "2")
    stale_delete = await api.delete(f"Patient/{pid}", headers={"If-Match": 'W/"1"'})
    assert stale_delete.status_code == 412
    assert (await api.get(f"Patient/{pid}")).status_code == 200


async def test_concurrent_updates_with_same_if_match_exactly_one_wins(api):
    system = new_system()
    pid = location_id(await api.post("Patient", patient(system)))
    responses = await asyncio.gather(*(
        api.put(f"Patient/{pid}", {**patient(system, gender=g), "id": pid}, headers={"If-Match": 'W/"1"'})
        for g in ("male", "female", "other", "unknown")
    ))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 412, 412, 412], [r.text for r in responses]
    winner = next(r for r in responses if r.status_code == 200).json()["gender"]
    read = (await api.get(f"Patient/{pid}")).json()
    assert (read["gender"], read["meta"]["versionId"]) == (winner, "2")
    history = (await api.get(f"Patient/{pid}/_history")).json()
    assert len(history["entry"]) == 2


async def test_concurrent_conditional_creates_make_one_resource(api):
    system = new_system()
    responses = await asyncio.gather(*(
        api.post("Patient", patient(system), headers={"If-None-Exist": f"identifier={system}|1"}) for _ in range(4)
    ))
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 201], [r.text for r in responses]
    assert len({location_id(r) for r in responses}) == 1
    assert await count(api, f"Patient?identifier={system}|1") == 1


# ------------------------------------------------------------------------------------- Prefer


@pytest.mark.parametrize("prefer", ["return=minimal", "return=representation", "return=OperationOutcome"])
async def test_prefer_return(api, prefer):
    system = new_system()
    response = await api.post("Patient", patient(system), headers={"Prefer": prefer})
    assert response.status_code == 201
    assert response.headers["etag"] == 'W/"1"' and response.headers["location"].startswith(f"{BASE}/Patient/")
    pid = location_id(response)
    update = await api.put(f"Patient/{pid}", {**patient(system, active=False), "id": pid}, headers={"Prefer": prefer})
    assert update.status_code == 200 and update.headers["etag"] == 'W/"2"'
    for result in (response, update):
        if prefer == "return=minimal":
            assert result.content == b""
        elif prefer == "return=representation":
            assert result.json()["resourceType"] == "Patient" and result.json()["id"] == pid
        else:
            assert result.json()["resourceType"] == "OperationOutcome"
            assert result.json()["issue"][0]["severity"] == "information"


# ----------------------------------------------------------------------------- formats, metadata


async def test_format_json_is_served_and_xml_is_406(api):
    pid = location_id(await api.post("Patient", patient(new_system())))
    for fmt in ("json", "application/fhir+json", "application/json"):
        response = await api.get(f"Patient/{pid}?_format={fmt}")
        assert response.status_code == 200 and response.json()["id"] == pid
    for fmt in ("xml", "application/fhir+xml"):
        response = await api.get(f"Patient/{pid}?_format={fmt}")
        assert response.status_code == 406 and outcome_code(response) == "not-supported"
    encoded = await api.get(f"Patient/{pid}?%5Fformat=xml")  # the name percent-encoded is the same parameter
    assert encoded.status_code == 406 and outcome_code(encoded) == "not-supported"
    accept_xml = await api.get(f"Patient/{pid}", headers={"Accept": "application/fhir+xml"})
    assert accept_xml.status_code == 406
    accept_any = await api.get(f"Patient/{pid}", headers={"Accept": "application/fhir+json, */*;q=0.1"})
    assert accept_any.status_code == 200


async def test_metadata_without_token_lists_every_held_type_and_its_search_params(client):
    from fhirkit.search import definitions
    from servicekit.topology import ALL_TYPES

    response = await client.get("/fhir/metadata")
    assert response.status_code == 200
    statement = response.json()
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"] == "4.0.1" and statement["kind"] == "instance"
    assert "application/fhir+json" in statement["format"]
    rest = statement["rest"][0]
    held = {resource["type"]: resource for resource in rest["resource"]}
    assert set(held) == set(ALL_TYPES)
    for name, resource in held.items():
        codes = {i["code"] for i in resource["interaction"]}
        assert {"read", "vread", "update", "patch", "delete", "create", "search-type", "history-type"} <= codes
        params = {p["name"]: p["type"] for p in resource.get("searchParam", [])}
        official = {n: p.type for n, p in definitions.parameters_for(name).items() if p.type not in ("composite", "special")}
        assert params == official, name
        assert any(op["name"] == "validate" for op in resource.get("operation", [])), name
    assert {"transaction", "batch"} <= {i["code"] for i in rest["interaction"]}
    assert (await client.get("/fhir/metadata?_format=xml")).status_code == 406


# ----------------------------------------------------------------------------------- $validate


async def test_validate_valid_and_invalid(api):
    valid = await api.post("Patient/$validate", patient(new_system()))
    assert valid.status_code == 200
    outcome = valid.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert all(issue["severity"] in ("information", "warning") for issue in outcome["issue"])
    invalid = await api.post("Patient/$validate", {"resourceType": "Patient", "gender": "robot", "colour": "red"})
    assert invalid.status_code == 200
    issues = invalid.json()["issue"]
    assert any(issue["severity"] == "error" for issue in issues)
    assert any("colour" in " ".join(issue.get("expression", [])) for issue in issues)
    wrapped = await api.post("Patient/$validate", {
        "resourceType": "Parameters", "parameter": [{"name": "resource", "resource": {"resourceType": "Patient", "active": "yes"}}],
    })
    assert wrapped.status_code == 200 and wrapped.json()["issue"][0]["severity"] == "error"
    assert await count(api, "Patient?gender=robot") == 0  # $validate stores nothing

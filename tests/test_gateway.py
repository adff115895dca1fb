"""The gateway: authentication, scope enforcement per type and interaction, routing, operations."""

import httpx
import orjson

from tests.support import outcome_code

PATIENT = {"resourceType": "Patient", "gender": "female", "name": [{"family": "周", "given": ["敏"]}]}


async def test_metadata_and_smart_discovery_need_no_token(client: httpx.AsyncClient) -> None:
    metadata = await client.get("/fhir/metadata")
    assert metadata.status_code == 200
    assert metadata.headers["content-type"].startswith("application/fhir+json")
    statement = metadata.json()
    assert statement["fhirVersion"] == "4.0.1"
    assert statement["rest"][0]["security"]["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    smart = await client.get("/fhir/.well-known/smart-configuration")
    assert smart.status_code == 200
    assert set(smart.json()["token_endpoint_auth_methods_supported"]) >= {
        "private_key_jwt", "client_secret_basic", "client_secret_post"
    }


async def test_no_token_is_401_with_a_challenge(client: httpx.AsyncClient) -> None:
    for method, path in (("GET", "/fhir/Patient"), ("POST", "/fhir/Patient"), ("GET", "/fhir/Patient/x"),
                         ("POST", "/fhir"), ("GET", "/fhir/Unknown")):
        response = await client.request(method, path)
        assert response.status_code == 401, (method, path)
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert outcome_code(response) == "login"


async def test_a_forged_token_is_401(client: httpx.AsyncClient) -> None:
    response = await client.get("/fhir/Patient", headers={"Authorization": "Bearer not.a.token"})
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


async def test_scopes_are_enforced_per_type_and_interaction(api) -> None:
    read_only = {"scope": "system/Patient.rs"}
    assert (await api.get("Patient", **read_only)).status_code == 200
    refused = await api.post("Patient", PATIENT, **read_only)
    assert refused.status_code == 403
    assert outcome_code(refused) == "forbidden"
    assert (await api.get("Observation", **read_only)).status_code == 403

    created = await api.post("Patient", PATIENT)
    assert created.status_code == 201
    patient_id = created.json()["id"]
    assert (await api.get(f"Patient/{patient_id}", **read_only)).status_code == 200
    assert (await api.delete(f"Patient/{patient_id}", **read_only)).status_code == 403
    assert (await api.get(f"Patient/{patient_id}")).status_code == 200  # the refused delete wrote nothing


async def test_v1_scopes_work_too(api) -> None:
    assert (await api.get("Patient", scope="system/Patient.read")).status_code == 200
    assert (await api.post("Patient", PATIENT, scope="system/Patient.read")).status_code == 403
    assert (await api.post("Patient", PATIENT, scope="system/Patient.write")).status_code == 201


async def test_every_bundle_entry_is_checked_against_the_scopes(api) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"resource": PATIENT, "request": {"method": "POST", "url": "Patient"}}],
    }
    response = await api.post("", bundle, scope="system/Patient.rs")
    assert response.status_code == 403
    assert outcome_code(response) == "forbidden"


async def test_request_id_is_returned_and_minted_when_absent(api) -> None:
    response = await api.get("Patient", params={"_count": 1}, headers={"X-Request-ID": "his-trace-42"})
    assert response.headers["x-request-id"] == "his-trace-42"
    minted = await api.get("Patient", params={"_count": 1})
    assert len(minted.headers["x-request-id"]) >= 16


async def test_unknown_and_unheld_types(api) -> None:
    unheld = await api.get("MolecularSequence")
    assert unheld.status_code == 404
    assert outcome_code(unheld) == "not-supported"
    garbage = await api.get("NotAType")
    assert garbage.status_code == 404


async def test_shared_types_are_routed_by_content(api) -> None:
    # A finished invitation (history brought over from an earlier system) is routed like any other;
    # a live one must also carry the invitation content (tests/test_telemedicine.py).
    telemedicine = {
        "resourceType": "ServiceRequest",
        "status": "completed",
        "intent": "proposal",
        "category": [{"coding": [{"system": "http://county-alliance.org/fhir/CodeSystem/telemedicine-category",
                                  "code": "remote-ecg"}]}],
        "subject": {"reference": f"Patient/{(await api.post('Patient', PATIENT)).json()['id']}"},
    }
    created = await api.post("ServiceRequest", telemedicine)
    assert created.status_code == 201, created.text
    assert created.json()["id"].startswith("tm-")
    read = await api.get(f"ServiceRequest/{created.json()['id']}")
    assert read.status_code == 200
    referral = {**telemedicine, "category": [{"text": "上转"}]}
    created_referral = await api.post("ServiceRequest", referral)
    assert created_referral.status_code == 201
    assert not created_referral.json()["id"].startswith("tm-")
    found = await api.get("ServiceRequest", params={"category": "remote-ecg", "_id": created.json()["id"]})
    assert [e["resource"]["id"] for e in found.json()["entry"]] == [created.json()["id"]]


async def test_a_batch_search_of_a_shared_type_asks_every_owner(api) -> None:
    subject = {"reference": f"Patient/{(await api.post('Patient', PATIENT)).json()['id']}"}
    common = {"resourceType": "ServiceRequest", "status": "completed", "intent": "proposal", "subject": subject}
    remote = await api.post("ServiceRequest", {**common, "category": [{"coding": [{
        "system": "http://county-alliance.org/fhir/CodeSystem/telemedicine-category", "code": "remote-ecg"}]}]})
    referral = await api.post("ServiceRequest", {**common, "category": [{"text": "上转"}]})
    ids = sorted([remote.json()["id"], referral.json()["id"]])
    assert ids[1].startswith("tm-") and not ids[0].startswith("tm-")  # held by two services
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"ServiceRequest?_id={','.join(ids)}"}},
        {"request": {"method": "GET", "url": f"ServiceRequest/{ids[1]}"}},
        {"request": {"method": "GET", "url": "ServiceRequest?_id=no-such-thing"}},
    ]}
    answer = await api.post("", batch)
    assert answer.status_code == 200, answer.text
    searched, read, empty = answer.json()["entry"]
    assert sorted(e["resource"]["id"] for e in searched["resource"]["entry"]) == ids
    assert searched["response"]["status"].startswith("200")
    assert read["resource"]["id"] == ids[1]
    assert empty["resource"]["total"] == 0


async def test_health_and_metrics(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert set(ready.json()["services"]) == {"directory", "referral", "results-sharing", "telemedicine", "platform"}
    metrics = await client.get("/metrics")
    assert "alliance_http_requests_total" in metrics.text


async def test_services_refuse_callers_without_the_gateway_identity(system) -> None:
    for name in ("directory", "referral", "results-sharing", "telemedicine", "platform"):
        transport = httpx.ASGITransport(app=system.state.apps[name])
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as direct:
            for path in ("/fhir/Patient", "/fhir/NotAType", "/fhir/Observation/x", "/fhir/$referral-statistics"):
                response = await direct.get(path, headers={"X-Alliance-Identity": "forged.token.value"})
                assert response.status_code == 401, (name, path, response.status_code)
                assert outcome_code(response) == "login"


async def test_a_service_called_in_this_process_takes_the_handed_identity_and_only_that(system) -> None:
    # In-process calls hand the caller over in the ASGI scope (servicekit.inprocess), unsigned:
    # the scope is built by code, so a header of the same name is still only a header to verify.
    from servicekit.identity import IN_PROCESS_CALLER
    from servicekit.inprocess import call_asgi
    from servicekit.peers import SYSTEM_IDENTITY

    app = system.state.apps["directory"]
    handed, _, body = await call_asgi(app, "GET", "/fhir/Organization?_count=1", {}, b"", host="directory",
                                      caller=SYSTEM_IDENTITY)
    assert handed == 200 and orjson.loads(body)["resourceType"] == "Bundle"
    bare, _, _ = await call_asgi(app, "GET", "/fhir/Organization?_count=1", {}, b"", host="directory")
    assert bare == 401
    as_header, _, _ = await call_asgi(app, "GET", "/fhir/Organization?_count=1", {IN_PROCESS_CALLER: "x"}, b"",
                                      host="directory")
    assert as_header == 401


async def test_the_platform_mount_serves_fhir_to_signed_services_only(system, client: httpx.AsyncClient) -> None:
    # Services reach Consent at /internal/platform/fhir in distributed mode: the mounted app's FHIR
    # routes answer below the mount point, and only to the gateway-signed identity.
    from servicekit.identity import IDENTITY_HEADER, sign_identity
    from servicekit.peers import SYSTEM_IDENTITY

    forged = await client.get("/internal/platform/fhir/Consent", headers={IDENTITY_HEADER: "forged.token.value"})
    assert forged.status_code == 401 and outcome_code(forged) == "login"
    signed = sign_identity(SYSTEM_IDENTITY, system.state.settings.secret("internal_secret"))
    found = await client.get("/internal/platform/fhir/Consent", headers={IDENTITY_HEADER: signed})
    assert found.status_code == 200, found.text
    assert found.json()["resourceType"] == "Bundle"


async def test_an_oversized_body_is_refused_with_413(api) -> None:
    from fhirkit.api.router import MAX_BODY_BYTES

    huge = b'{"resourceType":"Patient","text":{"status":"generated","div":"' + b"x" * (MAX_BODY_BYTES + 10) + b'"}}'
    response = await api.post("Patient", huge)
    assert response.status_code == 413
    assert outcome_code(response) == "too-costly"


async def test_a_search_no_owner_is_named_for_merges_every_owner_in_order(api) -> None:
    patient = (await api.post("Patient", PATIENT)).json()["id"]
    telemedicine = {"system": "http://county-alliance.org/fhir/CodeSystem/telemedicine-category", "code": "remote-ecg"}
    created = []
    for index in range(5):
        body = {"resourceType": "ServiceRequest", "status": "completed", "intent": "proposal",
                "subject": {"reference": f"Patient/{patient}"}, "note": [{"text": f"#{index}"}]}
        if index % 2:
            body["category"] = [{"coding": [telemedicine]}]
        response = await api.post("ServiceRequest", body)
        assert response.status_code == 201
        created.append(response.json()["id"])
    assert any(i.startswith("tm-") for i in created) and any(not i.startswith("tm-") for i in created)

    seen, url, pages = [], f"ServiceRequest?subject=Patient/{patient}&_count=2", 0
    while url:
        page = (await api.get(url)).json()
        assert page["total"] == 5
        seen += [e["resource"]["id"] for e in page.get("entry", [])]
        following = [link["url"] for link in page["link"] if link["relation"] == "next"]
        url = following[0].split("/fhir/", 1)[1] if following else None
        pages += 1
        assert pages < 10
    assert seen == created  # every owner's rows, once each, in _lastUpdated order

    newest_first = await api.get("ServiceRequest", params={"subject": f"Patient/{patient}", "_sort": "-_lastUpdated"})
    assert [e["resource"]["id"] for e in newest_first.json()["entry"]] == list(reversed(created))
    bad = await api.get("ServiceRequest", params={"subject": f"Patient/{patient}", "_merged": "garbage!"})
    assert bad.status_code == 400

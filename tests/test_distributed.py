"""Distributed mode end to end: every service its own process on its own PostgreSQL database,
the gateway reaching them over HTTP, configured by environment only."""

import os
import uuid
from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import pytest

from tests import live
from tests.support import postgres_databases

POSTGRES = os.environ.get("ALLIANCE_TEST_POSTGRES_URL")
NATS_URL = os.environ.get("ALLIANCE_TEST_NATS_URL", "nats://127.0.0.1:4222")
SERVICES = ("directory", "referral", "results-sharing", "telemedicine")

pytestmark = pytest.mark.skipif(not POSTGRES, reason="distributed mode runs on PostgreSQL (ALLIANCE_TEST_POSTGRES_URL)")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    assert POSTGRES
    data_dir = tmp_path_factory.mktemp("distributed")
    with postgres_databases(POSTGRES, f"d{uuid.uuid4().hex[:8]}") as urls, ExitStack() as stack:
        ports = {name: live.free_port() for name in (*SERVICES, "gateway")}
        service_urls = {
            f"ALLIANCE_{name.upper().replace('-', '_')}_URL": f"http://127.0.0.1:{ports[name]}" for name in SERVICES
        }
        run = uuid.uuid4().hex[:8]
        env = live.environment(
            data_dir, urls, ALLIANCE_PUBLIC_BASE_URL=f"http://127.0.0.1:{ports['gateway']}/fhir",
            ALLIANCE_PLATFORM_URL=f"http://127.0.0.1:{ports['gateway']}/internal/platform",
            # The real broker, on a stream of this run's own.
            ALLIANCE_NATS_URL=NATS_URL, ALLIANCE_NATS_STREAM=f"E2E_{run}", ALLIANCE_NATS_SUBJECT_PREFIX=f"e2e{run}.events",
            **service_urls,
        )
        stack.callback(_delete_stream, f"E2E_{run}")
        live.run_cli(env, "migrate")
        for name in SERVICES:
            stack.enter_context(live.serve(env, name, ports[name]))
        gateway = stack.enter_context(live.serve(env, "gateway", ports["gateway"]))
        live.run_cli(env, "directory", "load", "services/directory/src/directory/demo/alliance.yaml")
        client = live.create_client(env, "Organization/qingxi-county-hospital")
        lab = live.create_client(env, "Organization/qingxi-lab-center")
        yield {"url": gateway, "token": live.token(gateway, client), "lab_token": live.token(gateway, lab),
               "stream": f"E2E_{run}",
               **{n: f"http://127.0.0.1:{p}" for n, p in ports.items()}}


def _delete_stream(name: str) -> None:
    import asyncio

    import nats

    async def delete() -> None:
        connection = await nats.connect(NATS_URL)
        try:
            await connection.jetstream().delete_stream(name)
        except Exception:
            pass
        await connection.close()

    asyncio.run(delete())


def _events_in_stream(name: str) -> int:
    import asyncio

    import nats

    async def count() -> int:
        connection = await nats.connect(NATS_URL)
        info = await connection.jetstream().stream_info(name)
        await connection.close()
        return int(info.state.messages)

    return asyncio.run(count())


def _headers(deployment: dict[str, str], token: str = "token") -> dict[str, str]:
    return {"Authorization": f"Bearer {deployment[token]}", "Content-Type": "application/fhir+json"}


def test_each_service_is_its_own_process_and_refuses_unsigned_calls(deployment: dict[str, str]) -> None:
    for name in SERVICES:
        assert httpx.get(f"{deployment[name]}/readyz").json()["status"] == "ready"
        for resource_type in ("Patient", "Observation", "NotAType"):
            direct = httpx.get(f"{deployment[name]}/fhir/{resource_type}", headers=_headers(deployment))
            assert direct.status_code == 401  # a client token is not the gateway's signed identity
    ready = httpx.get(f"{deployment['url']}/readyz").json()
    assert ready["status"] == "ready" and set(SERVICES) <= set(ready["services"])


def test_write_and_read_across_services_through_the_gateway(deployment: dict[str, str]) -> None:
    base = f"{deployment['url']}/fhir"
    headers = _headers(deployment, "lab_token")  # the county's lab center posts a result
    patient = httpx.get(f"{base}/Patient", params={"_count": 1}, headers=headers).json()["entry"][0]["resource"]
    observation = _lab_result(f"Patient/{patient['id']}")
    created = httpx.post(f"{base}/Observation", json=observation, headers={**headers, "X-Request-ID": "e2e-req-1"})
    assert created.status_code == 201, created.text
    assert created.headers["x-request-id"] == "e2e-req-1"
    assert created.headers["location"].startswith(base + "/Observation/")

    found = httpx.get(f"{base}/Observation", params={"subject": f"Patient/{patient['id']}", "code": "http://loinc.org|718-7"}, headers=headers)
    assert found.status_code == 200
    assert [e["resource"]["id"] for e in found.json()["entry"]] == [created.json()["id"]]

    # The results service checked the subject through the directory's API: a missing patient is refused.
    missing = httpx.post(f"{base}/Observation", json={**observation, "subject": {"reference": "Patient/nobody-here"}}, headers=headers)
    assert missing.status_code == 422
    assert "Patient/nobody-here" in missing.json()["issue"][0]["diagnostics"]
    # The county hospital has no treatment relationship with this patient: the result is not there for it.
    hidden = httpx.get(created.headers["location"].split("/_history")[0], headers=_headers(deployment))
    assert hidden.status_code == 404


def test_the_platform_api_for_services_needs_the_signed_identity(deployment: dict[str, str]) -> None:
    # Services read Consent at the gateway's platform mount (ALLIANCE_PLATFORM_URL); clients cannot.
    direct = httpx.get(f"{deployment['url']}/internal/platform/fhir/Consent", headers=_headers(deployment))
    assert direct.status_code == 401


def test_metadata_merges_every_service(deployment: dict[str, str]) -> None:
    statement = httpx.get(f"{deployment['url']}/fhir/metadata").json()
    types = {r["type"] for r in statement["rest"][0]["resource"]}
    assert {"Patient", "ServiceRequest", "Observation", "Appointment", "AuditEvent"} <= types


def test_services_expose_metrics(deployment: dict[str, str]) -> None:
    for name in SERVICES:
        metrics = httpx.get(f"{deployment[name]}/metrics")
        assert metrics.status_code == 200
        assert "alliance_http_requests_total" in metrics.text


def test_writes_reach_the_nats_stream(deployment: dict[str, str]) -> None:
    import time

    base = f"{deployment['url']}/fhir"
    created = httpx.post(f"{base}/Patient", json={"resourceType": "Patient", "gender": "unknown"},
                         headers=_headers(deployment))
    assert created.status_code == 201
    stream = deployment["stream"]
    deadline = time.monotonic() + 10
    while _events_in_stream(stream) == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _events_in_stream(stream) > 0


def test_a_subscriber_is_notified_of_a_write_in_another_process_through_nats(deployment: dict[str, str]) -> None:
    """results-sharing (its own process) writes; the event crosses NATS to the gateway's hub,
    which notifies the lab center's rest-hook."""
    base = f"{deployment['url']}/fhir"
    headers = _headers(deployment, "lab_token")
    patient = httpx.get(f"{base}/Patient", params={"_count": 1, "_sort": "-_id"}, headers=headers).json()
    patient_ref = f"Patient/{patient['entry'][0]['resource']['id']}"
    receiver = live.NotificationReceiver()
    try:
        subscription = {
            "resourceType": "Subscription", "status": "requested", "reason": "分布式通知",
            "criteria": "http://county-alliance.org/fhir/SubscriptionTopic/result-available",
            "_criteria": {"extension": [{"url": f"{BACKPORT}/backport-filter-criteria",
                                         "valueString": f"Observation?patient={patient_ref}"}]},
            "channel": {"type": "rest-hook", "endpoint": receiver.url, "payload": "application/fhir+json",
                        "header": ["Authorization: Bearer receiver-token"],
                        "_payload": {"extension": [{"url": f"{BACKPORT}/backport-payload-content",
                                                    "valueCode": "id-only"}]}},
        }
        created = httpx.post(f"{base}/Subscription", json=subscription, headers=headers)
        assert created.status_code == 201, created.text
        live.wait_until("the handshake", lambda: receiver.statuses("handshake"))
        result = httpx.post(f"{base}/Observation", json=_lab_result(patient_ref), headers=headers)
        assert result.status_code == 201, result.text
        events = live.wait_until("the notification", receiver.events)
        assert events == [(1, f"Observation/{result.json()['id']}")]
        status = httpx.get(f"{base}/Subscription/{created.json()['id']}/$status", headers=headers).json()
        assert status["entry"][0]["resource"]["eventsSinceSubscriptionStart"] == "1"
    finally:
        receiver.stop()


BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"


def _lab_result(patient_ref: str) -> dict[str, object]:
    return {
        "resourceType": "Observation",
        "identifier": [{"system": "http://county-alliance.org/fhir/sid/report-number", "value": uuid.uuid4().hex}],
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "718-7", "display": "Hemoglobin"}]},
        "subject": {"reference": patient_ref},
        "effectiveDateTime": "2026-11-21T09:00:00+08:00",
        "performer": [{"reference": "Organization/qingxi-lab-center"}],
        "valueQuantity": {"value": 12.9, "unit": "g/dL", "system": "http://unitsofmeasure.org", "code": "g/dL"},
    }


def test_a_transaction_spanning_services_over_http(deployment: dict[str, str]) -> None:
    """The gateway's saga (gateway/cross_transaction.py) with each service its own process: the
    dry runs and commits are HTTP calls carrying the internal step header."""
    base = f"{deployment['url']}/fhir"
    headers = _headers(deployment)
    patient = httpx.get(f"{base}/Patient", params={"_count": 1}, headers=headers).json()["entry"][0]["resource"]

    def bundle(key: str, **condition_extra: object) -> dict[str, object]:
        ident = [{"system": "urn:test:distributed-transaction", "value": key}]
        document_url = f"urn:uuid:{uuid.uuid4()}"
        subject = {"reference": f"Patient/{patient['id']}"}
        return {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": document_url, "request": {"method": "POST", "url": "DocumentReference"},
             "resource": {"resourceType": "DocumentReference", "status": "current", "identifier": ident,
                          "subject": subject, "content": [{"attachment": {"contentType": "text/plain", "data": "5a6M"}}]}},
            {"request": {"method": "POST", "url": "Condition"},
             "resource": {"resourceType": "Condition", "identifier": ident, "subject": subject, "code": {"text": "高血压"},
                          "evidence": [{"detail": [{"reference": document_url}]}], **condition_extra}},
        ]}

    stored = httpx.post(base, json=bundle("ok"), headers=headers)
    assert stored.status_code == 200, stored.text
    document, condition = (e["resource"] for e in stored.json()["entry"])
    assert condition["evidence"][0]["detail"] == [{"reference": f"DocumentReference/{document['id']}"}]
    assert httpx.get(f"{base}/DocumentReference/{document['id']}", headers=headers).status_code == 200

    key = uuid.uuid4().hex
    refused = httpx.post(base, json=bundle(key, encounter={"reference": "Encounter/nowhere"}), headers=headers)
    assert refused.status_code == 422, refused.text
    assert "Bundle.entry[1]" in refused.json()["issue"][0]["diagnostics"]
    found = httpx.get(f"{base}/DocumentReference", params={"identifier": f"urn:test:distributed-transaction|{key}"},
                      headers=headers)
    assert found.status_code == 200 and not found.json().get("entry"), found.text

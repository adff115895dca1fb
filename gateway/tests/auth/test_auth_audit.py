"""Every token request leaves an AuditEvent (DICOM 110114 User Authentication / Login) in the trail."""

import base64
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from sqlalchemy import select

from fhirkit.store.tables import resource
from gateway.auth import create_client
from servicekit.settings import AllianceSettings

ADDRESS = "198.51.100.7"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
FORM = {"grant_type": "client_credentials", "scope": "system/Patient.rs"}
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@pytest.fixture(scope="module")
async def system(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    from gateway.app import create_gateway_app, service_definitions
    from servicekit.migrations import upgrade

    settings = AllianceSettings(
        data_dir=tmp_path_factory.mktemp("auth-audit"), public_base_url="http://127.0.0.1:8080/fhir",
        log_json=False, internal_secret="audit-internal-secret-0123456789abcdef0123456789",
        token_signing_key="audit-token-signing-key-0123456789abcdef012345",
    )
    for name, definition in service_definitions().items():
        upgrade(settings.database_url(name), definition.all_lineages)
    app = create_gateway_app(settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture(scope="module")
async def http(system: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=system, client=(ADDRESS, 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080") as client:
        yield client


async def _client(system: Any, organization: str, scope: str = "system/Patient.rs", **extra: Any) -> tuple[str, str]:
    engine = system.state.apps["platform"].state.database.engine
    client_id = f"c-{uuid.uuid4().hex[:10]}"
    secret = None if "jwks" in extra else f"secret-{uuid.uuid4().hex}"
    await create_client(engine, organization=organization, scope=scope, name=client_id, level="county",
                        client_id=client_id, client_secret=secret, **extra)
    return client_id, secret or ""


def _basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


async def _login_events(system: Any, client_id: str) -> list[dict[str, Any]]:
    await system.state.audit.flush()
    database = system.state.apps["platform"].state.database
    async with database.transaction(write=False) as conn:
        rows = await conn.execute(select(resource.c.content).where(resource.c.resource_type == "AuditEvent"))
        events = [orjson.loads(row[0]) for row in rows]
    return [e for e in events if e["type"]["code"] == "110114"
            and any(a["who"].get("identifier", {}).get("value") == client_id for a in e["agent"])]


async def test_success_and_failures_are_audited_without_credentials(system: Any, http: httpx.AsyncClient) -> None:
    client_id, secret = await _client(system, "Organization/audit-county")
    assert (await http.post("/auth/token", data=FORM, headers=_basic(client_id, secret))).status_code == 200
    assert (await http.post("/auth/token", data=FORM, headers=_basic(client_id, "wrong-1"))).status_code == 401
    posted = await http.post("/auth/token", data=FORM | {"client_id": client_id, "client_secret": "wrong-2"})
    assert posted.status_code == 401

    events = await _login_events(system, client_id)
    assert len(events) == 3
    for event in events:
        AuditEvent.model_validate(event)  # a valid R4 AuditEvent
        raw = orjson.dumps(event)
        assert secret.encode() not in raw and b"wrong-1" not in raw and b"wrong-2" not in raw
        assert event["subtype"] == [{"system": DCM, "code": "110122", "display": "Login"}]
        assert event["action"] == "E"
        agent = event["agent"][0]
        assert agent["who"]["reference"] == "Organization/audit-county"
        assert agent["network"] == {"address": ADDRESS, "type": "2"}
    outcomes = sorted((e["outcome"], e.get("outcomeDesc", "")) for e in events)
    assert outcomes[0] == ("0", "")
    assert outcomes[1][0] == outcomes[2][0] == "4"
    assert all(desc.startswith("HTTP 401: invalid_client") for _, desc in outcomes[1:])
    success = next(e for e in events if e["outcome"] == "0")
    details = {d["type"]: d["valueString"] for d in success["entity"][0]["detail"]}
    assert details == {"grant_type": "client_credentials", "token_endpoint_auth_method": "client_secret_basic",
                       "scope": "system/Patient.rs"}


async def test_unknown_and_nameless_callers_are_audited(system: Any, http: httpx.AsyncClient) -> None:
    stranger = f"nobody-{uuid.uuid4().hex[:8]}"
    assert (await http.post("/auth/token", data=FORM, headers=_basic(stranger, "guess"))).status_code == 401
    events = await _login_events(system, stranger)
    assert len(events) == 1 and events[0]["outcome"] == "4"
    assert "reference" not in events[0]["agent"][0]["who"]  # no organization for an unknown client
    hostile = "x" * 300 + "\u202e"
    assert (await http.post("/auth/token", data=FORM | {"client_id": hostile, "client_secret": "s"})).status_code == 401
    await system.state.audit.flush()
    assert not await _login_events(system, hostile)  # recorded by digest, never as sent


async def test_an_assertion_is_never_recorded(system: Any, http: httpx.AsyncClient, rs384_key: Any,
                                              make_assertion: Any) -> None:
    client_id, _ = await _client(system, "Organization/audit-lab", jwks={"keys": [rs384_key.public_jwk]})
    assertion = make_assertion(rs384_key, client_id, "http://127.0.0.1:8080/auth/token")
    form = FORM | {"client_assertion_type": ASSERTION_TYPE, "client_assertion": assertion}
    assert (await http.post("/auth/token", data=form)).status_code == 200
    replayed = await http.post("/auth/token", data=form)
    assert replayed.status_code == 401
    events = await _login_events(system, client_id)
    assert sorted(e["outcome"] for e in events) == ["0", "4"]
    signature = assertion.rsplit(".", 1)[1]
    assert all(signature.encode() not in orjson.dumps(e) for e in events)


async def test_a_lockout_is_audited_as_429(system: Any, http: httpx.AsyncClient) -> None:
    client_id, secret = await _client(system, "Organization/audit-locked")
    for _ in range(5):  # the default limit per client
        assert (await http.post("/auth/token", data=FORM, headers=_basic(client_id, "wrong"))).status_code == 401
    locked = await http.post("/auth/token", data=FORM, headers=_basic(client_id, secret))
    assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0
    events = await _login_events(system, client_id)
    assert [e for e in events if e.get("outcomeDesc", "").startswith("HTTP 429: temporarily_unavailable")]


async def test_an_organizations_auditor_reads_the_logins_of_its_clients(system: Any, http: httpx.AsyncClient) -> None:
    own, own_secret = await _client(system, "Organization/audit-township")
    other, other_secret = await _client(system, "Organization/audit-elsewhere")
    auditor, auditor_secret = await _client(system, "Organization/audit-township",
                                            scope="system/AuditEvent.rs alliance/audit")
    for client_id, secret in ((own, own_secret), (other, other_secret)):
        assert (await http.post("/auth/token", data=FORM, headers=_basic(client_id, secret))).status_code == 200
    token = (await http.post("/auth/token", data={**FORM, "scope": "system/AuditEvent.rs alliance/audit"},
                             headers=_basic(auditor, auditor_secret))).json()["access_token"]
    await system.state.audit.flush()
    found = await http.get("/fhir/AuditEvent", params={"subtype": f"{DCM}|110122", "_count": "200"},
                           headers={"Authorization": f"Bearer {token}"})
    assert found.status_code == 200, found.text
    clients = {e["resource"]["agent"][0]["who"]["identifier"]["value"] for e in found.json().get("entry", [])}
    assert own in clients and auditor in clients
    assert other not in clients


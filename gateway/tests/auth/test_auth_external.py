"""Access tokens of an external issuer, its JWK Set served by a real HTTP server on loopback."""

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from fastapi import FastAPI, Request, Response
from sqlalchemy.ext.asyncio import AsyncEngine

from fhirkit.errors import FhirError
from gateway.auth import AuthSettings, ExternalIssuer, ExternalIssuerConfig, authenticate, create_client
from gateway.auth.tokens import issue_access_token
from servicekit.settings import AllianceSettings

BASE_URL = "http://testserver/fhir"
ISSUER = "https://idp.example.gov.cn/realms/alliance"
AUDIENCE = "county-alliance-fhir"


class JwksServer:
    """A JWK Set on http://127.0.0.1:<free port>/jwks that counts how often it was asked."""

    def __init__(self) -> None:
        self.jwks: dict[str, Any] = {"keys": []}
        self.status = 200
        self.hits = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.hits += 1
                body = json.dumps(owner.jwks).encode()
                self.send_response(owner.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "JwksServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


SigningKey = Any  # conftest.SigningKey


@pytest.fixture(scope="module")
def idp_keys(new_signing_key: Any) -> dict[str, SigningKey]:
    return {alg: new_signing_key(alg, f"idp-{alg.lower()}") for alg in ("RS256", "RS384", "ES256", "ES384")}


@pytest.fixture
def idp(idp_keys: dict[str, SigningKey]) -> Iterator[JwksServer]:
    with JwksServer() as server:
        server.jwks = {"keys": [key.public_jwk for key in idp_keys.values()]}
        yield server


def _issuer(server: JwksServer, **overrides: Any) -> ExternalIssuer:
    values: dict[str, Any] = {"issuer": ISSUER, "jwks_url": server.url, "audience": AUDIENCE}
    return ExternalIssuer(ExternalIssuerConfig(**(values | overrides)))


def _app(engine: AsyncEngine, settings: AuthSettings) -> FastAPI:
    app = FastAPI()

    @app.exception_handler(FhirError)
    async def render(request: Request, exc: FhirError) -> Response:
        return Response(exc.to_bytes(), status_code=exc.status_code, headers=exc.headers,
                        media_type="application/fhir+json")

    @app.get("/fhir/Patient")
    async def patients(request: Request) -> dict[str, Any]:
        identity, scopes = await authenticate(request, engine=engine, settings=settings)
        return {"client_id": identity.client_id, "organization": identity.organization, "level": identity.level,
                "roles": list(identity.roles), "may_search": scopes.permits("Patient", "s"),
                "may_create": scopes.permits("Patient", "c")}

    return app


@pytest.fixture
async def call(sqlite_engine: AsyncEngine, idp: JwksServer) -> AsyncIterator[Any]:
    """GET /fhir/Patient with a bearer token, through an app trusting `idp` (or the issuer given)."""
    apps: dict[int, httpx.AsyncClient] = {}
    default = _issuer(idp)

    async def get(token: str, issuer: ExternalIssuer | None = None) -> httpx.Response:
        chosen = issuer or default
        if id(chosen) not in apps:
            settings = AuthSettings(base_url=BASE_URL, signing_key=b"g" * 32, client_cache_seconds=0,
                                    external_issuer=chosen)
            apps[id(chosen)] = httpx.AsyncClient(transport=httpx.ASGITransport(_app(sqlite_engine, settings)),
                                                 base_url="http://testserver")
        return await apps[id(chosen)].get("/fhir/Patient", headers={"Authorization": f"Bearer {token}"})

    yield get
    for http in apps.values():
        await http.aclose()


def _token(key: SigningKey, *, headers: dict[str, Any] | None = None, **claims: Any) -> str:
    now = int(time.time())
    payload: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 300, "iat": now,
                               "client_id": "township-his", "org": "Organization/thc-xikou",
                               "scope": "openid system/Patient.rs"}
    payload = {k: v for k, v in (payload | claims).items() if v is not None}
    return jwt.encode(payload, key.private_key, algorithm=key.alg, headers={"kid": key.kid, **(headers or {})})


@pytest.mark.parametrize("alg", ["RS256", "RS384", "ES256", "ES384"])
async def test_the_issuers_tokens_are_accepted(call: Any, idp_keys: dict[str, SigningKey], alg: str) -> None:
    response = await call(_token(idp_keys[alg], level="township"))
    assert response.status_code == 200, response.text
    assert response.json() == {"client_id": "ext:township-his", "organization": "Organization/thc-xikou",
                               "level": "township", "roles": [], "may_search": True, "may_create": False}


async def test_our_own_tokens_still_work_beside_the_issuers(call: Any, sqlite_engine: AsyncEngine) -> None:
    await create_client(sqlite_engine, organization="Organization/county", scope="system/Patient.rs",
                        name="County HIS", level="county", client_id="county-his", client_secret="county-secret")
    token, _ = issue_access_token(client_id="county-his", organization="Organization/county", level="county",
                                  scope="system/Patient.rs", key=b"g" * 32, issuer=BASE_URL)
    response = await call(token)
    assert response.status_code == 200, response.text
    assert response.json()["client_id"] == "county-his"


@pytest.mark.parametrize(
    "claims",
    [
        {"iss": "https://idp.example.gov.cn/realms/other"},
        {"iss": None},
        {"aud": "someone-else"},
        {"aud": None},
        {"exp": int(time.time()) - 60},
        {"exp": None},
        {"nbf": int(time.time()) + 600},
        {"org": None},
        {"org": "Organization/../Patient/1"},
        {"org": ["Organization/thc-xikou"]},
        {"typ": "ID"},
    ],
    ids=["wrong-iss", "no-iss", "wrong-aud", "no-aud", "expired", "no-exp", "not-yet", "no-org", "bad-org",
         "org-list", "id-token"],
)
async def test_tokens_failing_a_claim_check_are_refused(
    call: Any, idp_keys: dict[str, SigningKey], claims: dict[str, Any]
) -> None:
    response = await call(_token(idp_keys["RS384"], **claims))
    assert response.status_code == 401, response.text
    assert response.json()["resourceType"] == "OperationOutcome"
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forged(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    signature = _b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()) if secret else ""
    return f"{signing_input}.{signature}"


async def test_none_and_hmac_tokens_are_refused(call: Any, idp_keys: dict[str, SigningKey]) -> None:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 300, "client_id": "x", "org": "Organization/a",
               "scope": "system/*.cruds"}
    public_pem = idp_keys["RS256"].private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    forged = [
        _forged({"alg": "none", "kid": "idp-rs256"}, payload, None),
        _forged({"alg": "HS256", "kid": "idp-rs256"}, payload, public_pem),  # the classic key confusion
        _forged({"alg": "HS384", "kid": "idp-rs256"}, payload, public_pem),
    ]
    for token in forged:
        response = await call(token)
        assert response.status_code == 401, (token[:40], response.text)


async def test_key_urls_in_the_token_are_never_followed(call: Any, idp: JwksServer, new_signing_key: Any) -> None:
    attacker_key = new_signing_key("RS256", "attacker")
    with JwksServer() as attacker:
        attacker.jwks = {"keys": [attacker_key.public_jwk]}
        headers = {"jku": attacker.url, "x5u": attacker.url, "jwk": attacker_key.public_jwk}
        response = await call(_token(attacker_key, headers=headers))
        assert response.status_code == 401
        assert attacker.hits == 0
    assert idp.hits >= 1  # only the configured JWKS URL was asked


async def test_a_rotated_key_is_fetched_once(
    call: Any, idp: JwksServer, idp_keys: dict[str, SigningKey], new_signing_key: Any
) -> None:
    issuer = _issuer(idp, min_refetch_seconds=0)
    assert (await call(_token(idp_keys["RS384"]), issuer)).status_code == 200
    assert idp.hits == 1
    assert (await call(_token(idp_keys["ES384"]), issuer)).status_code == 200
    assert idp.hits == 1  # cached
    rotated = new_signing_key("RS384", "idp-rotated")
    idp.jwks = {"keys": [rotated.public_jwk]}
    assert (await call(_token(rotated), issuer)).status_code == 200
    assert idp.hits == 2


async def test_a_flood_of_unknown_kids_does_not_hammer_the_issuer(
    call: Any, idp: JwksServer, idp_keys: dict[str, SigningKey]
) -> None:
    issuer = _issuer(idp, min_refetch_seconds=60)
    assert (await call(_token(idp_keys["RS384"]), issuer)).status_code == 200
    key = idp_keys["RS384"]
    for n in range(30):
        forged = _token(key, headers={"kid": f"made-up-{n}"})
        assert (await call(forged, issuer)).status_code == 401
    assert idp.hits == 1
    # With refetching allowed every time, each unknown kid would have cost the issuer a request.
    eager = _issuer(idp, min_refetch_seconds=0)
    for n in range(3):
        await call(_token(key, headers={"kid": f"other-{n}"}), eager)
    assert idp.hits == 1 + 1 + 3


async def test_concurrent_unknown_kids_share_one_fetch(
    call: Any, idp: JwksServer, idp_keys: dict[str, SigningKey]
) -> None:
    import asyncio

    issuer = _issuer(idp, min_refetch_seconds=60)
    tokens = [_token(idp_keys["RS384"], headers={"kid": f"unknown-{n}"}) for n in range(10)]
    responses = await asyncio.gather(*(call(token, issuer) for token in tokens))
    assert {r.status_code for r in responses} == {401}
    assert idp.hits == 1


async def test_an_unreachable_or_broken_issuer_is_401_not_500(
    call: Any, idp: JwksServer, idp_keys: dict[str, SigningKey]
) -> None:
    idp.status = 503
    assert (await call(_token(idp_keys["RS384"]), _issuer(idp))).status_code == 401
    idp.status = 200
    idp.jwks = {"keys": "not a list"}  # type: ignore[dict-item]
    assert (await call(_token(idp_keys["RS384"]), _issuer(idp))).status_code == 401
    with JwksServer() as gone:
        url = gone.url
    nowhere = ExternalIssuer(ExternalIssuerConfig(issuer=ISSUER, jwks_url=url, audience=AUDIENCE, timeout_seconds=1))
    assert (await call(_token(idp_keys["RS384"]), nowhere)).status_code == 401


async def test_known_keys_survive_an_issuer_outage(
    call: Any, idp: JwksServer, idp_keys: dict[str, SigningKey]
) -> None:
    issuer = _issuer(idp, jwks_cache_seconds=0.01, min_refetch_seconds=0)
    assert (await call(_token(idp_keys["RS384"]), issuer)).status_code == 200
    idp.status = 500
    time.sleep(0.02)
    assert (await call(_token(idp_keys["RS384"]), issuer)).status_code == 200


async def test_claim_names_and_shapes_are_configurable(
    call: Any, idp: JwksServer, idp_keys: dict[str, SigningKey]
) -> None:
    issuer = _issuer(idp, organization_claim="alliance_org", scope_claim="scp", client_claim="azp")
    token = _token(idp_keys["ES384"], org=None, client_id=None, scope=None, alliance_org="thc-xikou",
                   scp=["system/Patient.cruds", "alliance/audit", "profile"], azp="provincial-portal")
    response = await call(token, issuer)
    assert response.status_code == 200, response.text
    assert response.json() == {"client_id": "ext:provincial-portal", "organization": "Organization/thc-xikou",
                               "level": None, "roles": ["auditor"], "may_search": True, "may_create": True}


async def test_a_token_naming_no_client_falls_back_to_sub(call: Any, idp_keys: dict[str, SigningKey]) -> None:
    response = await call(_token(idp_keys["RS256"], client_id=None, sub="service-account-lis"))
    assert response.status_code == 200
    assert response.json()["client_id"] == "ext:service-account-lis"


def test_settings_build_the_issuer(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"ALLIANCE_EXTERNAL_ISSUER": ISSUER, "ALLIANCE_EXTERNAL_JWKS_URL": "https://idp/jwks",
                        "ALLIANCE_EXTERNAL_SCOPE_CLAIM": "scp", "ALLIANCE_AUTH_MAX_FAILURES_PER_CLIENT": "3",
                        "ALLIANCE_TOKEN_SIGNING_KEY": "k" * 40}.items():
        monkeypatch.setenv(name, value)
    settings = AuthSettings.from_settings(AllianceSettings(public_base_url="https://fhir.example/fhir"))
    assert settings.external_issuer is not None
    config = settings.external_issuer.config
    assert (config.issuer, config.jwks_url, config.audience, config.scope_claim, config.organization_claim) == (
        ISSUER, "https://idp/jwks", "https://fhir.example/fhir", "scp", "org")
    assert settings.lockout.max_failures_per_client == 3
    assert AuthSettings.from_settings(AllianceSettings(external_issuer=None, external_jwks_url=None,
                                                       token_signing_key="k" * 40)).external_issuer is None


@pytest.mark.parametrize(
    "values",
    [
        {"external_issuer": ISSUER},
        {"external_jwks_url": "https://idp/jwks"},
        {"external_issuer": ISSUER, "external_jwks_url": "http://idp/jwks", "environment": "production"},
        {"external_issuer": ISSUER, "external_jwks_url": "file:///etc/passwd"},
    ],
)
def test_incomplete_or_unsafe_issuer_settings_refuse_to_start(values: dict[str, Any]) -> None:
    settings = AllianceSettings(**values, token_signing_key="k" * 40, internal_secret="i" * 40)
    with pytest.raises(ValueError):
        AuthSettings.from_settings(settings)


async def test_the_whole_gateway_trusts_the_configured_issuer(
    idp: JwksServer, idp_keys: dict[str, SigningKey], tmp_path: Any
) -> None:
    """The settings reach the running gateway (ALLIANCE_EXTERNAL_*), not only the auth module."""
    from gateway.app import create_gateway_app, service_definitions
    from servicekit.migrations import upgrade
    from tests.support import system_settings

    settings = system_settings(tmp_path, external_issuer=ISSUER, external_jwks_url=idp.url,
                               external_audience=AUDIENCE)
    for name, definition in service_definitions().items():
        upgrade(settings.database_url(name), definition.all_lineages)
    app = create_gateway_app(settings)
    token = _token(idp_keys["ES384"], scope="system/Organization.rs")
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8080"
    ) as client:
        accepted = await client.get("/fhir/Organization", headers={"Authorization": f"Bearer {token}"})
        other_audience = _token(idp_keys["ES384"], aud="someone-else", scope="system/Organization.rs")
        refused = await client.get("/fhir/Organization", headers={"Authorization": f"Bearer {other_audience}"})
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["resourceType"] == "Bundle"
    assert refused.status_code == 401

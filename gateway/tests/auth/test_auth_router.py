import base64
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from sqlalchemy.ext.asyncio import AsyncEngine

from fhirkit.errors import FhirError
from gateway.auth import (
    AuthSettings,
    JwksFetcher,
    authenticate,
    build_auth_router,
    create_client,
    set_enabled,
)
from gateway.auth.tokens import issue_access_token

BASE_URL = "http://testserver/fhir"
TOKEN_URL = "http://testserver/auth/token"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
SETTINGS = AuthSettings(base_url=BASE_URL, signing_key=b"g" * 32, client_cache_seconds=0)


def _app(
    engine: AsyncEngine, settings: AuthSettings = SETTINGS, fetcher: JwksFetcher | None = None
) -> FastAPI:
    app = FastAPI()
    app.include_router(
        build_auth_router(get_engine=lambda request: engine, settings=settings, jwks_fetcher=fetcher)
    )

    @app.exception_handler(FhirError)
    async def render(request: Request, exc: FhirError) -> Response:
        return Response(
            exc.to_bytes(),
            status_code=exc.status_code,
            headers=exc.headers,
            media_type="application/fhir+json",
        )

    @app.get("/fhir/Patient")
    async def patients(request: Request) -> dict[str, Any]:
        identity, scopes = await authenticate(request, engine=engine, settings=settings)
        return {
            "client_id": identity.client_id,
            "organization": identity.organization,
            "level": identity.level,
            "scopes": list(identity.scopes),
            "may_search": scopes.permits("Patient", "s"),
        }

    return app


@pytest.fixture
async def http(engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(_app(engine)), base_url="http://testserver"
    ) as c:
        yield c


async def _secret_client(engine: AsyncEngine, **overrides: Any) -> tuple[str, str]:
    args: dict[str, Any] = {
        "organization": "Organization/county-hospital",
        "scope": "system/Patient.rs system/Task.cru",
        "name": "County HIS",
        "level": "county",
        "client_id": "county-his",
        "client_secret": "county-secret",
    }
    args.update(overrides)
    client = await create_client(engine, **args)
    assert client.client_secret is not None
    return client.client_id, client.client_secret


def _basic(client_id: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


def _assert_no_store(response: httpx.Response) -> None:
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["pragma"] == "no-cache"


async def test_discovery(http: httpx.AsyncClient) -> None:
    response = await http.get("/fhir/.well-known/smart-configuration")
    assert response.status_code == 200
    doc = response.json()
    assert doc["token_endpoint"] == TOKEN_URL
    assert doc["grant_types_supported"] == ["client_credentials"]
    assert doc["token_endpoint_auth_methods_supported"] == [
        "private_key_jwt",
        "client_secret_basic",
        "client_secret_post",
    ]
    assert doc["token_endpoint_auth_signing_alg_values_supported"] == ["RS384", "ES384"]
    assert "system/*.rs" in doc["scopes_supported"]
    assert set(doc["capabilities"]) == {
        "client-confidential-asymmetric",
        "client-confidential-symmetric",
        "permission-v1",
        "permission-v2",
    }
    assert "plain" not in doc["code_challenge_methods_supported"]


async def test_token_with_basic_then_use_it(http: httpx.AsyncClient, engine: AsyncEngine) -> None:
    client_id, secret = await _secret_client(engine)
    response = await http.post(
        "/auth/token",
        data={"grant_type": "client_credentials", "scope": "system/Patient.*"},
        headers=_basic(client_id, secret),
    )
    assert response.status_code == 200, response.text
    _assert_no_store(response)
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 300
    assert body["scope"] == "system/Patient.read"
    me = await http.get("/fhir/Patient", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert me.status_code == 200, me.text
    assert me.json() == {
        "client_id": "county-his",
        "organization": "Organization/county-hospital",
        "level": "county",
        "scopes": ["system/Patient.read"],
        "may_search": True,
    }


async def test_basic_credentials_are_form_urlencoded(http: httpx.AsyncClient, engine: AsyncEngine) -> None:
    await _secret_client(engine, client_secret="a:b+c%d-long")
    encoded = "a%3Ab%2Bc%25d-long"
    response = await http.post(
        "/auth/token",
        data={"grant_type": "client_credentials", "scope": "system/*.rs"},
        headers=_basic("county-his", encoded),
    )
    assert response.status_code == 200, response.text


async def test_token_with_client_secret_post(http: httpx.AsyncClient, engine: AsyncEngine) -> None:
    client_id, secret = await _secret_client(engine)
    response = await http.post(
        "/auth/token",
        data={
            "grant_type": "client_credentials",
            "scope": "system/Task.cruds",
            "client_id": client_id,
            "client_secret": secret,
        },
    )
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "system/Task.cru"


@pytest.mark.parametrize("key_fixture", ["rs384_key", "es384_key"])
async def test_token_with_private_key_jwt(
    http: httpx.AsyncClient,
    engine: AsyncEngine,
    make_assertion: Any,
    request: pytest.FixtureRequest,
    key_fixture: str,
) -> None:
    key = request.getfixturevalue(key_fixture)
    await create_client(
        engine,
        organization="Organization/township-1",
        scope="system/*.rs",
        name="Township",
        level="township",
        client_id="township-1",
        jwks={"keys": [key.public_jwk]},
    )
    response = await http.post(
        "/auth/token",
        data={
            "grant_type": "client_credentials",
            "scope": "system/Observation.rs",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": make_assertion(key, "township-1", TOKEN_URL),
        },
    )
    assert response.status_code == 200, response.text
    _assert_no_store(response)
    assert response.json()["scope"] == "system/Observation.rs"


async def test_private_key_jwt_via_allow_listed_jwks_url(
    engine: AsyncEngine, es384_key: Any, make_assertion: Any
) -> None:
    await create_client(
        engine,
        organization="Organization/township-1",
        scope="system/*.rs",
        name="Township",
        level=None,
        client_id="township-1",
        jwks_url="https://township.example/jwks.json",
    )

    def jwks(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, json={"keys": [es384_key.public_jwk]}, headers={"Cache-Control": "max-age=60"}
        )

    fetcher = JwksFetcher(["https://township.example"], transport=httpx.MockTransport(jwks))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(_app(engine, fetcher=fetcher)), base_url="http://testserver"
    ) as http:
        response = await http.post(
            "/auth/token",
            data={
                "grant_type": "client_credentials",
                "scope": "system/*.rs",
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": make_assertion(es384_key, "township-1", TOKEN_URL),
            },
        )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("case", ["replay", "expired", "wrong-aud", "disabled", "unknown"])
async def test_private_key_jwt_refused(
    http: httpx.AsyncClient, engine: AsyncEngine, rs384_key: Any, make_assertion: Any, case: str
) -> None:
    await create_client(
        engine,
        organization="Organization/township-1",
        scope="system/*.rs",
        name="Township",
        level=None,
        client_id="township-1",
        jwks={"keys": [rs384_key.public_jwk]},
    )
    assertion = make_assertion(rs384_key, "township-1", TOKEN_URL)
    form = {
        "grant_type": "client_credentials",
        "scope": "system/*.rs",
        "client_assertion_type": ASSERTION_TYPE,
    }
    if case == "replay":
        first = await http.post("/auth/token", data={**form, "client_assertion": assertion})
        assert first.status_code == 200
    elif case == "expired":
        assertion = make_assertion(rs384_key, "township-1", TOKEN_URL, exp=1_000_000_000)
    elif case == "wrong-aud":
        assertion = make_assertion(rs384_key, "township-1", "http://testserver/other/token")
    elif case == "disabled":
        await set_enabled(engine, "township-1", False)
    elif case == "unknown":
        assertion = make_assertion(rs384_key, "nobody", TOKEN_URL)
    response = await http.post("/auth/token", data={**form, "client_assertion": assertion})
    assert response.status_code == 401, response.text
    assert response.json()["error"] == "invalid_client"
    assert "www-authenticate" not in response.headers  # Basic was not used
    _assert_no_store(response)


async def test_wrong_secret(http: httpx.AsyncClient, engine: AsyncEngine) -> None:
    client_id, _ = await _secret_client(engine)
    form = {"grant_type": "client_credentials", "scope": "system/*.rs"}
    basic = await http.post("/auth/token", data=form, headers=_basic(client_id, "wrong"))
    assert basic.status_code == 401
    assert basic.json()["error"] == "invalid_client"
    assert basic.headers["www-authenticate"].startswith("Basic")
    posted = await http.post("/auth/token", data={**form, "client_id": client_id, "client_secret": "wrong"})
    assert posted.status_code == 401
    assert posted.json()["error"] == "invalid_client"
    unknown = await http.post("/auth/token", data=form, headers=_basic("nobody", "wrong"))
    assert unknown.status_code == 401
    assert unknown.json() == basic.json()  # an unknown client looks like a wrong secret


async def test_disabled_client(http: httpx.AsyncClient, engine: AsyncEngine) -> None:
    client_id, secret = await _secret_client(engine)
    form = {"grant_type": "client_credentials", "scope": "system/*.rs"}
    issued = await http.post("/auth/token", data=form, headers=_basic(client_id, secret))
    bearer = {"Authorization": f"Bearer {issued.json()['access_token']}"}
    assert (await http.get("/fhir/Patient", headers=bearer)).status_code == 200

    await set_enabled(engine, client_id, False)
    refused = await http.post("/auth/token", data=form, headers=_basic(client_id, secret))
    assert refused.status_code == 401
    assert refused.json()["error"] == "invalid_client"
    stopped = await http.get("/fhir/Patient", headers=bearer)
    assert stopped.status_code == 401
    assert 'error="invalid_token"' in stopped.headers["www-authenticate"]
    assert stopped.json()["issue"][0]["code"] == "login"


async def test_disabling_takes_effect_after_the_cache_window(engine: AsyncEngine) -> None:
    settings = AuthSettings(base_url=BASE_URL, signing_key=b"g" * 32, client_cache_seconds=3600)
    await _secret_client(engine)
    token, _ = issue_access_token(
        client_id="county-his",
        organization="Organization/county-hospital",
        level="county",
        scope="system/Patient.rs",
        key=settings.signing_key,
        issuer=BASE_URL,
    )
    bearer = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(_app(engine, settings)), base_url="http://testserver"
    ) as http:
        assert (await http.get("/fhir/Patient", headers=bearer)).status_code == 200
        await set_enabled(engine, "county-his", False)
        # Within the window the cached registry entry still answers; the default window is 5 s.
        assert (await http.get("/fhir/Patient", headers=bearer)).status_code == 200


async def test_withdrawn_scope_stops_old_tokens(http: httpx.AsyncClient, engine: AsyncEngine) -> None:
    client_id, secret = await _secret_client(engine)
    issued = await http.post(
        "/auth/token",
        data={"grant_type": "client_credentials", "scope": "system/*.cruds"},
        headers=_basic(client_id, secret),
    )
    bearer = {"Authorization": f"Bearer {issued.json()['access_token']}"}
    await _secret_client(engine, scope="system/Task.cru")  # Patient access withdrawn
    me = await http.get("/fhir/Patient", headers=bearer)
    assert me.status_code == 200
    assert me.json()["scopes"] == ["system/Task.cru"]
    assert me.json()["may_search"] is False
    await _secret_client(engine, scope="system/Observation.rs")  # nothing of the token is left
    assert (await http.get("/fhir/Patient", headers=bearer)).status_code == 401


@pytest.mark.parametrize(
    ("scope", "granted"),
    [
        ("system/*.cruds", "system/Patient.rs system/Task.cru"),
        ("system/Patient.read", "system/Patient.read"),
        ("system/Patient.rs junk system/Observation.rs", "system/Patient.rs"),
        ("system/*.rs openid", "system/Patient.rs system/Task.r"),
    ],
)
async def test_scope_narrowing(
    http: httpx.AsyncClient, engine: AsyncEngine, scope: str, granted: str
) -> None:
    client_id, secret = await _secret_client(engine)
    response = await http.post(
        "/auth/token",
        data={"grant_type": "client_credentials", "scope": scope},
        headers=_basic(client_id, secret),
    )
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == granted


@pytest.mark.parametrize("scope", ["system/Observation.rs", "patient/Patient.rs", "junk", "", None])
async def test_invalid_scope(http: httpx.AsyncClient, engine: AsyncEngine, scope: str | None) -> None:
    client_id, secret = await _secret_client(engine)
    form = {"grant_type": "client_credentials"} | ({"scope": scope} if scope is not None else {})
    response = await http.post("/auth/token", data=form, headers=_basic(client_id, secret))
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_scope"
    _assert_no_store(response)


@pytest.mark.parametrize(
    ("form", "use_basic", "status", "error"),
    [
        ({"scope": "system/*.rs"}, True, 400, "invalid_request"),
        ({"grant_type": "authorization_code", "scope": "system/*.rs"}, True, 400, "unsupported_grant_type"),
        ({"grant_type": "password", "scope": "system/*.rs"}, True, 400, "unsupported_grant_type"),
        ({"grant_type": "client_credentials", "scope": "system/*.rs"}, False, 401, "invalid_client"),
        (
            {
                "grant_type": "client_credentials",
                "scope": "system/*.rs",
                "client_id": "county-his",
                "client_secret": "county-secret",
            },
            True,
            400,
            "invalid_request",
        ),
        (
            {
                "grant_type": "client_credentials",
                "scope": "system/*.rs",
                "client_assertion_type": "other",
                "client_assertion": "x",
            },
            False,
            400,
            "invalid_request",
        ),
        (
            {
                "grant_type": "client_credentials",
                "scope": "system/*.rs",
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": "not-a-jwt",
            },
            False,
            401,
            "invalid_client",
        ),
        (
            {"grant_type": "client_credentials", "scope": "system/*.rs", "client_id": "someone-else"},
            True,
            401,
            "invalid_client",
        ),
    ],
    ids=[
        "no-grant",
        "auth-code",
        "password",
        "no-auth",
        "two-methods",
        "bad-assertion-type",
        "bad-assertion",
        "client-id-mismatch",
    ],
)
async def test_oauth_errors(
    http: httpx.AsyncClient,
    engine: AsyncEngine,
    form: dict[str, str],
    use_basic: bool,
    status: int,
    error: str,
) -> None:
    await _secret_client(engine)
    headers = _basic("county-his", "county-secret") if use_basic else {}
    response = await http.post("/auth/token", data=form, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["error"] == error
    assert response.json()["error_description"]


async def test_non_form_body_and_repeated_parameters(http: httpx.AsyncClient, engine: AsyncEngine) -> None:
    as_json = await http.post("/auth/token", json={"grant_type": "client_credentials"})
    assert as_json.status_code == 400 and as_json.json()["error"] == "invalid_request"
    repeated = await http.post(
        "/auth/token",
        content="grant_type=client_credentials&scope=system/*.rs&scope=system/*.cruds",
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            **_basic("county-his", "county-secret"),
        },
    )
    assert repeated.status_code == 400 and repeated.json()["error"] == "invalid_request"


@pytest.mark.parametrize(
    ("authorization", "error"),
    [
        (None, None),
        ("Basic Y291bnR5LWhpczpzZWNyZXQ=", None),
        ("Bearer", None),
        ("Bearer not-a-token", "invalid_token"),
    ],
)
async def test_bearer_challenge(
    http: httpx.AsyncClient, authorization: str | None, error: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = await http.get("/fhir/Patient", headers=headers)
    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="alliance"')
    assert ('error="invalid_token"' in challenge) is (error is not None)


async def test_token_for_another_issuer_or_key_refused(http: httpx.AsyncClient, engine: AsyncEngine) -> None:
    await _secret_client(engine)
    claims = {
        "client_id": "county-his",
        "organization": "Organization/county-hospital",
        "level": "county",
        "scope": "system/*.rs",
    }
    foreign_key, _ = issue_access_token(**claims, key=b"x" * 32, issuer=BASE_URL)
    foreign_issuer, _ = issue_access_token(**claims, key=SETTINGS.signing_key, issuer="http://other/fhir")
    for token in (foreign_key, foreign_issuer):
        response = await http.get("/fhir/Patient", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401


async def test_settings_validation() -> None:
    with pytest.raises(ValueError):
        AuthSettings(base_url=BASE_URL, signing_key=b"short")
    settings = AuthSettings(base_url="https://gw.example/fhir/", signing_key=b"g" * 32)
    assert settings.base_url == "https://gw.example/fhir"
    assert settings.token_url == "https://gw.example/auth/token"

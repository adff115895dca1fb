import time
from types import SimpleNamespace
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from sqlalchemy.ext.asyncio import AsyncEngine

from fhirkit.errors import Unauthorized
from gateway.auth.clients import RegisteredClient, create_client
from gateway.auth.tokens import (
    CLOCK_SKEW_SECONDS,
    JwksFetcher,
    OAuthError,
    _max_age,
    is_allowed_jwks_url,
    issue_access_token,
    verify_access_token,
    verify_client_assertion,
)
from servicekit.identity import CallerIdentity, sign_identity

KEY = b"k" * 32
ISSUER = "http://testserver/fhir"
TOKEN_URL = "http://testserver/auth/token"


def _issue(**overrides: Any) -> str:
    args: dict[str, Any] = {
        "client_id": "c1",
        "organization": "Organization/1",
        "level": "county",
        "scope": "system/*.rs",
        "key": KEY,
        "issuer": ISSUER,
    }
    args.update(overrides)
    return issue_access_token(**args)[0]


# --- access tokens ---------------------------------------------------------------------------------


def test_access_token_round_trip() -> None:
    token, expires_in = issue_access_token(
        client_id="c1",
        organization="Organization/1",
        level=None,
        scope="system/*.rs",
        key=KEY,
        issuer=ISSUER,
        ttl_seconds=120,
    )
    assert expires_in == 120
    claims = verify_access_token(token, KEY, issuer=ISSUER)
    assert (claims["sub"], claims["org"], claims["scope"], claims["level"]) == (
        "c1",
        "Organization/1",
        "system/*.rs",
        None,
    )
    assert claims["exp"] - claims["iat"] == 120
    assert claims["jti"]


@pytest.mark.parametrize(
    ("token", "key", "issuer"),
    [
        (lambda: _issue(ttl_seconds=-30), KEY, ISSUER),
        (lambda: _issue(), b"x" * 32, ISSUER),
        (lambda: _issue(), KEY, "http://elsewhere/fhir"),
        (lambda: "not-a-jwt", KEY, ISSUER),
        # an internal identity token is a valid HS256 JWT, but not an access token
        (lambda: sign_identity(CallerIdentity("c1", "Organization/1", (), None), KEY), KEY, ISSUER),
        (
            lambda: jwt.encode(
                {"iss": ISSUER, "sub": "c1"}, KEY, algorithm="HS256", headers={"typ": "at+jwt"}
            ),
            KEY,
            ISSUER,
        ),
    ],
    ids=["expired", "wrong-key", "wrong-issuer", "garbage", "identity-token", "missing-claims"],
)
def test_access_token_refused(token: Any, key: bytes, issuer: str) -> None:
    with pytest.raises(Unauthorized) as caught:
        verify_access_token(token(), key, issuer=issuer)
    assert caught.value.headers["WWW-Authenticate"].startswith(
        'Bearer realm="alliance", error="invalid_token"'
    )


def test_a_verified_token_is_remembered_but_still_expires() -> None:
    # Accepted for a few more seconds (its expiry plus the allowed clock skew), then refused even
    # though it was verified before.
    token = _issue(ttl_seconds=3 - CLOCK_SKEW_SECONDS)
    claims = verify_access_token(token, KEY, issuer=ISSUER)
    assert verify_access_token(token, KEY, issuer=ISSUER) is claims  # no second signature check
    with pytest.raises(Unauthorized):  # remembered for one key and issuer only
        verify_access_token(token, b"x" * 32, issuer=ISSUER)
    time.sleep(max(0.0, claims["exp"] + CLOCK_SKEW_SECONDS - time.time()) + 0.1)
    with pytest.raises(Unauthorized):
        verify_access_token(token, KEY, issuer=ISSUER)


# --- JWKS URL allow-list and caching ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://idp.example/jwks.json", True),
        ("https://IDP.example:443/other/path", True),  # origin entry admits any path on that origin
        ("https://idp.example.evil.net/jwks.json", False),  # the prefix-matching bug
        ("https://evil.net/?https://idp.example", False),
        ("https://user@idp.example/jwks.json", False),
        ("http://idp.example/jwks.json", False),  # scheme is part of the origin
        ("https://idp.example:8443/jwks.json", False),
        ("https://his.example/keys/jwks.json", True),  # exact URL entry
        ("https://his.example/keys/other.json", False),
        ("https://his.example/keys/jwks.json?x=1", False),
        ("file:///etc/passwd", False),
        ("not a url", False),
    ],
)
def test_jwks_allow_list(url: str, allowed: bool) -> None:
    allow_list = ["https://idp.example", "https://his.example/keys/jwks.json"]
    assert is_allowed_jwks_url(url, allow_list) is allowed


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        (None, 0),
        ("max-age=60", 60),
        ("public, max-age=120", 120),
        ("no-store", 0),
        ("max-age=60, no-cache", 0),
        ("max-age=999999", 3600),
        ("max-age=junk", 0),
    ],
)
def test_cache_control(header: str | None, seconds: int) -> None:
    assert _max_age(header, 3600) == seconds


class _CountingJwks:
    def __init__(self, jwks: dict[str, Any], cache_control: str | None) -> None:
        self.jwks = jwks
        self.cache_control = cache_control
        self.calls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        headers = {"Cache-Control": self.cache_control} if self.cache_control else {}
        return httpx.Response(200, json=self.jwks, headers=headers)


async def test_fetcher_honours_max_age() -> None:
    server = _CountingJwks({"keys": [{"kid": "a"}]}, "max-age=300")
    fetcher = JwksFetcher(["https://idp.example"], transport=httpx.MockTransport(server))
    for _ in range(3):
        assert await fetcher.keys("https://idp.example/jwks.json") == [{"kid": "a"}]
    assert server.calls == 1


async def test_fetcher_does_not_cache_without_permission() -> None:
    server = _CountingJwks({"keys": []}, "no-store")
    fetcher = JwksFetcher(["https://idp.example"], transport=httpx.MockTransport(server))
    await fetcher.keys("https://idp.example/jwks.json")
    await fetcher.keys("https://idp.example/jwks.json")
    assert server.calls == 2


async def test_fetcher_never_fetches_outside_the_allow_list() -> None:
    server = _CountingJwks({"keys": []}, None)
    fetcher = JwksFetcher(["https://idp.example"], transport=httpx.MockTransport(server))
    with pytest.raises(OAuthError) as caught:
        await fetcher.keys("https://idp.example.evil.net/jwks.json")
    assert caught.value.error == "invalid_client"
    assert server.calls == 0


async def test_fetcher_does_not_follow_redirects() -> None:
    def redirect(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": "http://169.254.169.254/latest/meta-data"})

    fetcher = JwksFetcher(["https://idp.example"], transport=httpx.MockTransport(redirect))
    with pytest.raises(OAuthError, match="302"):
        await fetcher.keys("https://idp.example/jwks.json")


async def test_fetcher_refuses_huge_documents() -> None:
    huge = {"keys": [{"kid": "x" * 100_000}]}
    fetcher = JwksFetcher(["https://idp.example"], transport=httpx.MockTransport(_CountingJwks(huge, None)))
    with pytest.raises(OAuthError, match="too large"):
        await fetcher.keys("https://idp.example/jwks.json")


# --- client assertions -----------------------------------------------------------------------------


async def _key_client(engine: AsyncEngine, *keys: Any, **extra: Any) -> RegisteredClient:
    jwks = {"keys": [k.public_jwk for k in keys]} if keys else None
    return await create_client(
        engine,
        organization="Organization/1",
        scope="system/*.rs",
        name="backend",
        level=None,
        client_id="backend",
        jwks=jwks,
        **extra,
    )


async def test_assertion_accepted_rs384_and_es384(
    sqlite_engine: AsyncEngine, rs384_key: Any, es384_key: Any, make_assertion: Any
) -> None:
    client = await _key_client(sqlite_engine, rs384_key, es384_key)
    for key in (rs384_key, es384_key):
        await verify_client_assertion(
            make_assertion(key, "backend", TOKEN_URL), client, TOKEN_URL, sqlite_engine
        )


def _fresh_key(alg: str, kid: str) -> SimpleNamespace:
    if alg.startswith("RS"):
        private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    else:
        private = ec.generate_private_key({"ES256": ec.SECP256R1(), "ES512": ec.SECP521R1()}[alg])
        jwk = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    return SimpleNamespace(alg=alg, kid=kid, private_key=private, public_jwk={**jwk, "kid": kid})


@pytest.mark.parametrize("alg", ["RS256", "ES256", "ES512"])
async def test_assertion_other_common_algorithms(
    sqlite_engine: AsyncEngine, alg: str, make_assertion: Any
) -> None:
    key = _fresh_key(alg, "k")
    client = await _key_client(sqlite_engine, key)
    await verify_client_assertion(make_assertion(key, "backend", TOKEN_URL), client, TOKEN_URL, sqlite_engine)


def _forged_hs256(key: Any) -> str:
    return jwt.encode(
        {"iss": "backend", "sub": "backend", "aud": TOKEN_URL, "exp": int(time.time()) + 60, "jti": "x"},
        "s" * 32,
        algorithm="HS256",
        headers={"kid": key.kid},
    )


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("expired", "expired"),
        ("wrong-aud", "aud"),
        ("too-long", "5 minutes"),
        ("no-exp", "not accepted"),
        ("no-jti", "not accepted"),
        ("iss-sub-differ", "not accepted"),
        ("unknown-kid", "kid"),
        ("no-kid", "kid"),
        ("hs256", "alg"),
        ("other-key", "not accepted"),
    ],
)
async def test_assertion_refused(
    sqlite_engine: AsyncEngine, rs384_key: Any, es384_key: Any, make_assertion: Any, case: str, message: str
) -> None:
    client = await _key_client(sqlite_engine, rs384_key)
    now = int(time.time())
    assertion = {
        "expired": lambda: make_assertion(rs384_key, "backend", TOKEN_URL, exp=now - 60),
        "wrong-aud": lambda: make_assertion(rs384_key, "backend", "http://testserver/fhir"),
        "too-long": lambda: make_assertion(rs384_key, "backend", TOKEN_URL, exp=now + 3600),
        "no-exp": lambda: make_assertion(rs384_key, "backend", TOKEN_URL, exp=None),
        "no-jti": lambda: make_assertion(rs384_key, "backend", TOKEN_URL, jti=None),
        "iss-sub-differ": lambda: make_assertion(rs384_key, "backend", TOKEN_URL, sub="someone-else"),
        "unknown-kid": lambda: make_assertion(rs384_key, "backend", TOKEN_URL, kid="nope"),
        "no-kid": lambda: make_assertion(rs384_key, "backend", TOKEN_URL, kid=""),
        "hs256": lambda: _forged_hs256(rs384_key),
        # signed by a different RSA key under the registered kid
        "other-key": lambda: make_assertion(_fresh_key("RS384", rs384_key.kid), "backend", TOKEN_URL),
    }[case]()
    with pytest.raises(OAuthError, match=message) as caught:
        await verify_client_assertion(assertion, client, TOKEN_URL, sqlite_engine)
    assert caught.value.error == "invalid_client"
    assert caught.value.status == 401


async def test_assertion_replay_refused(
    sqlite_engine: AsyncEngine, es384_key: Any, make_assertion: Any
) -> None:
    client = await _key_client(sqlite_engine, es384_key)
    assertion = make_assertion(es384_key, "backend", TOKEN_URL)
    await verify_client_assertion(assertion, client, TOKEN_URL, sqlite_engine)
    with pytest.raises(OAuthError, match="already used"):
        await verify_client_assertion(assertion, client, TOKEN_URL, sqlite_engine)


async def test_assertion_with_key_of_the_wrong_type_refused(
    sqlite_engine: AsyncEngine, rs384_key: Any, es384_key: Any, make_assertion: Any
) -> None:
    # The EC key is registered under the RSA key's kid: an ES384 header must not select an RSA key or vice versa.
    client = await _key_client(sqlite_engine, rs384_key)
    confused = SimpleNamespace(alg="ES384", kid=rs384_key.kid, private_key=es384_key.private_key)
    with pytest.raises(OAuthError, match="kid"):
        await verify_client_assertion(
            make_assertion(confused, "backend", TOKEN_URL), client, TOKEN_URL, sqlite_engine
        )


async def test_assertion_key_from_allow_listed_jwks_url(
    sqlite_engine: AsyncEngine, es384_key: Any, make_assertion: Any
) -> None:
    client = await _key_client(sqlite_engine, jwks_url="https://his.example/.well-known/jwks.json")
    server = _CountingJwks({"keys": [es384_key.public_jwk]}, "max-age=60")
    fetcher = JwksFetcher(["https://his.example"], transport=httpx.MockTransport(server))
    for _ in range(2):
        await verify_client_assertion(
            make_assertion(es384_key, "backend", TOKEN_URL),
            client,
            TOKEN_URL,
            sqlite_engine,
            jwks_fetcher=fetcher,
        )
    assert server.calls == 1
    with pytest.raises(OAuthError, match="allow-list"):
        await verify_client_assertion(
            make_assertion(es384_key, "backend", TOKEN_URL),
            client,
            TOKEN_URL,
            sqlite_engine,
            jwks_fetcher=JwksFetcher(["https://other.example"], transport=httpx.MockTransport(server)),
        )
    assert server.calls == 1

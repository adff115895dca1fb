"""Access tokens signed by an external issuer (a provincial IdP, Keycloak), accepted besides our own.

The issuer, its JWK Set URL and the audience come from configuration only. Header parameters that
carry keys or say where to get them (`jku`, `x5u`, `jwk`, `x5c`) are ignored, never followed: the
key is always the configured JWK Set's key named by `kid`. Only asymmetric algorithms are accepted,
so neither `none` nor an HMAC "signed" with the issuer's public key can pass.

The JWK Set is cached for `jwks_cache_seconds`; a `kid` it does not hold (the issuer rotated its
keys) refetches it, at most once per `min_refetch_seconds` whatever the number of requests, and
concurrent misses share one fetch.
"""

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from gateway.auth.scopes import ROLE_SCOPES, ScopeSet
from gateway.auth.tokens import CLOCK_SKEW_SECONDS, MIN_RSA_BITS, _invalid_token, _usable
from servicekit.identity import CallerIdentity

log = logging.getLogger("alliance.auth")

EXTERNAL_ALGORITHMS = ("RS256", "RS384", "ES256", "ES384")
# External client ids live in their own namespace: ':' never occurs in a registered client id, so
# an issuer cannot mint a token passing for one of our registered clients.
EXTERNAL_CLIENT_PREFIX = "ext:"
NOT_ACCESS_TOKENS = ("ID", "Refresh", "Logout", "Offline")
_ORGANIZATION_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_CLIENT_VALUE = re.compile(r"^[\x21-\x7e]{1,120}$")
_LEVEL = re.compile(r"^[a-z-]{1,32}$")


@dataclass(frozen=True, kw_only=True)
class ExternalIssuerConfig:
    issuer: str
    jwks_url: str
    audience: str
    organization_claim: str = "org"
    scope_claim: str = "scope"
    client_claim: str = "client_id"
    level_claim: str = "level"
    jwks_cache_seconds: float = 300.0
    min_refetch_seconds: float = 30.0
    timeout_seconds: float = 5.0
    max_jwks_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        if not self.issuer:
            raise ValueError("the external issuer needs its exact `iss`")
        if not self.jwks_url.lower().startswith(("https://", "http://")):
            raise ValueError("the external issuer's JWKS URL must be an http(s) URL")
        if not self.audience:
            raise ValueError("the external issuer needs an audience")


class JwksUnavailable(Exception):
    pass


class IssuerKeys:
    """The issuer's JWK Set, fetched from the configured URL only."""

    def __init__(self, config: ExternalIssuerConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self._transport = transport
        self._keys: list[dict[str, Any]] | None = None
        self._expires_at = 0.0
        self._attempted_at = -float("inf")
        self._lock = asyncio.Lock()
        self.fetches = 0  # how often the issuer was asked (metrics, tests)

    async def key(self, kid: str, alg: str) -> RSAPublicKey | EllipticCurvePublicKey:
        keys = await self._current(refresh=False)
        match = _pick(keys, kid, alg)
        if match is None:
            match = _pick(await self._current(refresh=True), kid, alg)
        if match is None:
            raise _invalid_token("no key of the issuer matches the token's kid and alg")
        return _public_key(match, alg)

    async def _current(self, *, refresh: bool) -> list[dict[str, Any]]:
        now = time.monotonic()
        if self._keys is not None and now < self._expires_at and not refresh:
            return self._keys
        async with self._lock:  # concurrent misses wait for the one fetch instead of starting their own
            if self._attempted_at >= now:  # another request fetched while this one waited
                return self._usable_or_raise()
            if now - self._attempted_at < self.config.min_refetch_seconds:
                return self._usable_or_raise()  # asked too recently: answer from what we have
            self._attempted_at = time.monotonic()
            try:
                self.fetches += 1
                self._keys = await self._fetch()
                self._expires_at = time.monotonic() + self.config.jwks_cache_seconds
            except JwksUnavailable as exc:
                # Keep the keys we had: the issuer being down should not end every session at once.
                log.warning("external issuer JWKS unavailable: %s", exc)
        return self._usable_or_raise()

    def _usable_or_raise(self) -> list[dict[str, Any]]:
        if self._keys is None:
            raise _invalid_token("the issuer's keys are not available")
        return self._keys

    async def _fetch(self) -> list[dict[str, Any]]:
        config = self.config
        try:
            async with (
                httpx.AsyncClient(transport=self._transport, timeout=config.timeout_seconds, follow_redirects=False) as http,
                http.stream("GET", config.jwks_url, headers={"Accept": "application/json"}) as response,
            ):
                if response.status_code != 200:
                    raise JwksUnavailable(f"answered {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > config.max_jwks_bytes:
                        raise JwksUnavailable("document too large")
        except httpx.HTTPError as exc:
            raise JwksUnavailable(type(exc).__name__) from exc
        try:
            document = orjson.loads(bytes(body))
        except orjson.JSONDecodeError as exc:
            raise JwksUnavailable("not JSON") from exc
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise JwksUnavailable("not a JWK Set")
        return [k for k in document["keys"] if isinstance(k, dict)]


def _pick(keys: list[dict[str, Any]], kid: str, alg: str) -> dict[str, Any] | None:
    return next((k for k in keys if _usable(k, kid, alg)), None)


def _public_key(jwk: dict[str, Any], alg: str) -> RSAPublicKey | EllipticCurvePublicKey:
    try:
        key = jwt.PyJWK(jwk, algorithm=alg).key
    except jwt.PyJWTError as exc:
        raise _invalid_token("the issuer's key is unusable") from exc
    if isinstance(key, RSAPublicKey) and key.key_size >= MIN_RSA_BITS:
        return key
    if isinstance(key, EllipticCurvePublicKey):
        return key
    raise _invalid_token("the issuer's key is unusable")


class ExternalIssuer:
    """Verifies the issuer's access tokens and turns their claims into the caller's identity."""

    def __init__(self, config: ExternalIssuerConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self.keys = IssuerKeys(config, transport=transport)

    async def authenticate(self, token: str) -> tuple[CallerIdentity, ScopeSet]:
        """Raises Unauthorized (invalid_token) unless the token is the issuer's, current and for us."""
        claims = await self.verify(token)
        return self.identity(claims)

    async def verify(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise _invalid_token("token not accepted") from exc
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in EXTERNAL_ALGORITHMS:
            raise _invalid_token("token algorithm not accepted")
        if not isinstance(kid, str) or not kid:
            raise _invalid_token("token header needs a kid")
        key = await self.keys.key(kid, alg)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.config.audience,
                issuer=self.config.issuer,
                leeway=CLOCK_SKEW_SECONDS,
                options={"require": ["iss", "aud", "exp"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise _invalid_token("token expired") from exc
        except jwt.PyJWTError as exc:
            raise _invalid_token("token not accepted") from exc
        # Keycloak marks its other tokens in `typ`; an ID or refresh token is no access token.
        if claims.get("typ") in NOT_ACCESS_TOKENS:
            raise _invalid_token("not an access token")
        return claims

    def identity(self, claims: dict[str, Any]) -> tuple[CallerIdentity, ScopeSet]:
        config = self.config
        organization = _organization(claims.get(config.organization_claim))
        if organization is None:
            # Without an organization the access predicate cannot be built: refuse, as for our own tokens.
            raise _invalid_token("the token names no organization")
        client = _client_id(claims, config.client_claim)
        if client is None:
            raise _invalid_token("the token names no client")
        scopes = ScopeSet.parse(_scope_text(claims.get(config.scope_claim)))
        level = claims.get(config.level_claim)
        identity = CallerIdentity(
            client_id=EXTERNAL_CLIENT_PREFIX + client,
            organization=organization,
            scopes=scopes.strings(),
            level=level if isinstance(level, str) and _LEVEL.match(level) else None,
            roles=tuple(role for scope, role in ROLE_SCOPES.items() if scope in scopes.extras),
        )
        return identity, scopes


def _organization(value: Any) -> str | None:
    """`Organization/ID` or a bare id; anything else is no organization."""
    if not isinstance(value, str):
        return None
    organization_id = value.removeprefix("Organization/")
    return f"Organization/{organization_id}" if _ORGANIZATION_ID.match(organization_id) else None


def _client_id(claims: dict[str, Any], claim: str) -> str | None:
    for name in (claim, "azp", "sub"):
        value = claims.get(name)
        if isinstance(value, str) and _CLIENT_VALUE.match(value):
            return value
    return None


def _scope_text(value: Any) -> str:
    # Space-separated (`scope`, RFC 9068) or a list (`scp`, some IdPs).
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(v for v in value if isinstance(v, str))
    return ""

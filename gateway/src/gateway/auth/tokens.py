"""Access tokens issued by the gateway, and `private_key_jwt` client assertions (SMART Backend Services)."""

import hashlib
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from sqlalchemy.ext.asyncio import AsyncEngine

from fhirkit.errors import Unauthorized
from gateway.auth.clients import RegisteredClient, remember_jti

REALM = "alliance"
ACCESS_TOKEN_TYPE = "at+jwt"  # RFC 9068; keeps other HS256 JWTs from passing as access tokens
DEFAULT_TOKEN_TTL_SECONDS = 300
CLOCK_SKEW_SECONDS = 5
MAX_ASSERTION_LIFETIME_SECONDS = 300
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# RS384 and ES384 are what SMART requires; the others cost nothing extra to accept.
ASSERTION_ALGORITHMS: dict[str, tuple[str, str | None]] = {
    "RS384": ("RSA", None),
    "ES384": ("EC", "P-384"),
    "RS256": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES512": ("EC", "P-521"),
}
MIN_RSA_BITS = 2048
_ACCESS_CLAIMS = ("iss", "sub", "org", "scope", "iat", "exp", "jti")


class OAuthError(Exception):
    """An RFC 6749 §5.2 error; the token endpoint renders it as JSON."""

    def __init__(
        self, error: str, description: str, *, status: int | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status if status is not None else (401 if error == "invalid_client" else 400)
        self.retry_after = retry_after  # seconds, sent as Retry-After (lockouts)


def _invalid_token(description: str) -> Unauthorized:
    # Descriptions are ours, never echo client input: they go into a quoted header parameter.
    challenge = f'Bearer realm="{REALM}", error="invalid_token", error_description="{description}"'
    return Unauthorized(f"invalid access token: {description}", headers={"WWW-Authenticate": challenge})


# --- access tokens -------------------------------------------------------------------------------


def issue_access_token(
    *,
    client_id: str,
    organization: str,
    level: str | None,
    scope: str,
    key: bytes,
    issuer: str,
    ttl_seconds: int = DEFAULT_TOKEN_TTL_SECONDS,
) -> tuple[str, int]:
    now = int(time.time())
    claims = {
        "iss": issuer,
        "sub": client_id,
        "org": organization,
        "level": level,
        "scope": scope,
        "iat": now,
        "exp": now + ttl_seconds,
        "jti": secrets.token_urlsafe(16),
    }
    token = jwt.encode(claims, key, algorithm="HS256", headers={"typ": ACCESS_TOKEN_TYPE})
    return token, ttl_seconds


# Tokens already verified, until they expire: a client sends the same token on every request,
# and checking its signature and claims again cost about a tenth of a read by id.
_VERIFIED: dict[tuple[str, bytes, str], dict[str, Any]] = {}
_VERIFIED_MAX = 10_000


def verify_access_token(token: str, key: bytes, *, issuer: str) -> dict[str, Any]:
    cache_key = (token, key, issuer)
    claims = _VERIFIED.get(cache_key)
    if claims is not None and time.time() < claims["exp"] + CLOCK_SKEW_SECONDS:
        return claims
    claims = _verify_access_token(token, key, issuer=issuer)
    if len(_VERIFIED) >= _VERIFIED_MAX:
        _VERIFIED.clear()
    _VERIFIED[cache_key] = claims
    return claims


def _verify_access_token(token: str, key: bytes, *, issuer: str) -> dict[str, Any]:
    try:
        decoded = jwt.api_jwt.decode_complete(
            token,
            key,
            algorithms=["HS256"],
            issuer=issuer,
            leeway=CLOCK_SKEW_SECONDS,
            options={"require": list(_ACCESS_CLAIMS)},
        )
    except jwt.ExpiredSignatureError as exc:
        raise _invalid_token("token expired") from exc
    except jwt.PyJWTError as exc:
        raise _invalid_token("token not accepted") from exc
    if decoded["header"].get("typ") != ACCESS_TOKEN_TYPE:
        raise _invalid_token("not an access token")
    claims: dict[str, Any] = decoded["payload"]
    if not all(isinstance(claims[name], str) and claims[name] for name in ("sub", "org", "scope")):
        raise _invalid_token("malformed claims")
    if claims.get("level") is not None and not isinstance(claims["level"], str):
        raise _invalid_token("malformed claims")
    return claims


# --- JWKS fetching ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _UrlKey:
    scheme: str
    host: str
    port: int
    path: str
    query: str


def _url_key(url: str) -> _UrlKey | None:
    try:
        parts = urlsplit(url)
        port = parts.port or {"https": 443, "http": 80}.get(parts.scheme.lower(), 0)
    except ValueError:
        return None
    if parts.scheme.lower() not in ("https", "http") or not parts.hostname:
        return None
    if parts.username is not None or parts.password is not None or parts.fragment:
        return None
    return _UrlKey(parts.scheme.lower(), parts.hostname.lower(), port, parts.path or "/", parts.query)


def is_allowed_jwks_url(url: str, allow_list: Sequence[str]) -> bool:
    """Allow-list entries are exact URLs or bare origins (`https://host[:port]`).

    Parsed components are compared, never string prefixes (`https://idp.example` must not admit
    `https://idp.example.evil.net`).
    """
    target = _url_key(url)
    if target is None:
        return False
    for entry in allow_list:
        allowed = _url_key(entry)
        if allowed is None:
            continue
        same_origin = (allowed.scheme, allowed.host, allowed.port) == (
            target.scheme,
            target.host,
            target.port,
        )
        origin_entry = allowed.path == "/" and not allowed.query
        if same_origin and (origin_entry or allowed == target):
            return True
    return False


def _max_age(cache_control: str | None, cap: int) -> int:
    # SMART: never cache a JWKS longer than the client's Cache-Control says; no header means no caching.
    if not cache_control:
        return 0
    max_age = 0
    for directive in cache_control.lower().split(","):
        name, _, value = directive.strip().partition("=")
        if name in ("no-store", "no-cache"):
            return 0
        if name == "max-age":
            try:
                max_age = max(0, int(value.strip().strip('"')))
            except ValueError:
                return 0
    return min(max_age, cap)


@dataclass(slots=True)
class _CachedJwks:
    keys: list[dict[str, Any]]
    fetched_at: float
    expires_at: float


class JwksFetcher:
    """Fetches client JWK Sets from allow-listed URLs only, caching as the server's Cache-Control allows."""

    def __init__(
        self,
        allow_list: Sequence[str],
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout_seconds: float = 5.0,
        max_bytes: int = 64 * 1024,
        max_cache_seconds: int = 3600,
        min_refetch_seconds: float = 5.0,
    ) -> None:
        self.allow_list = tuple(allow_list)
        self._transport = transport
        self._timeout = timeout_seconds
        self._max_bytes = max_bytes
        self._max_cache = max_cache_seconds
        self._min_refetch = min_refetch_seconds
        self._cache: dict[str, _CachedJwks] = {}

    def allows(self, url: str) -> bool:
        return is_allowed_jwks_url(url, self.allow_list)

    async def keys(self, url: str, *, refresh: bool = False) -> list[dict[str, Any]]:
        if not self.allows(url):
            raise OAuthError("invalid_client", "the client's jwks_url is not on the allow-list")
        now = time.monotonic()
        cached = self._cache.get(url)
        # A kid miss may mean key rotation, but refetching on every miss would let anyone hammer the URL.
        fresh_enough = cached is not None and (not refresh or now - cached.fetched_at < self._min_refetch)
        if cached is not None and now < cached.expires_at and fresh_enough:
            return cached.keys
        keys, max_age = await self._fetch(url)
        if max_age > 0:
            self._cache[url] = _CachedJwks(keys, now, now + max_age)
        else:
            self._cache.pop(url, None)
        return keys

    async def _fetch(self, url: str) -> tuple[list[dict[str, Any]], int]:
        try:
            async with (
                httpx.AsyncClient(
                    transport=self._transport, timeout=self._timeout, follow_redirects=False
                ) as http,
                http.stream("GET", url, headers={"Accept": "application/json"}) as response,
            ):
                if response.status_code != 200:
                    raise OAuthError("invalid_client", f"jwks_url answered {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > self._max_bytes:
                        raise OAuthError("invalid_client", "jwks_url document too large")
                cache_control = response.headers.get("cache-control")
        except httpx.HTTPError as exc:
            raise OAuthError("invalid_client", "jwks_url could not be fetched") from exc
        try:
            document = orjson.loads(bytes(body))
        except orjson.JSONDecodeError as exc:
            raise OAuthError("invalid_client", "jwks_url did not return JSON") from exc
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise OAuthError("invalid_client", "jwks_url did not return a JWK Set")
        return [k for k in document["keys"] if isinstance(k, dict)], _max_age(cache_control, self._max_cache)


# --- client assertions (private_key_jwt) -----------------------------------------------------------


def _usable(jwk: dict[str, Any], kid: str, alg: str) -> bool:
    kty, crv = ASSERTION_ALGORITHMS[alg]
    return (
        jwk.get("kid") == kid
        and jwk.get("kty") == kty
        and (crv is None or jwk.get("crv") == crv)
        and jwk.get("alg", alg) == alg
        and jwk.get("use", "sig") == "sig"
        and "verify" in jwk.get("key_ops", ["verify"])
        and "d" not in jwk  # a private key in a JWK Set is a registration mistake, not a key to trust
    )


async def _find_key(
    client: RegisteredClient, kid: str, alg: str, fetcher: JwksFetcher | None
) -> RSAPublicKey | EllipticCurvePublicKey:
    candidates = [
        k for k in (client.jwks or {}).get("keys", []) if isinstance(k, dict) and _usable(k, kid, alg)
    ]
    if not candidates and client.jwks_url:
        if fetcher is None:
            raise OAuthError("invalid_client", "remote JWK Sets are not enabled")
        for refresh in (False, True):
            keys = await fetcher.keys(client.jwks_url, refresh=refresh)
            candidates = [k for k in keys if _usable(k, kid, alg)]
            if candidates:
                break
    if not candidates:
        raise OAuthError("invalid_client", "no registered key matches the assertion's kid and alg")
    try:
        key = jwt.PyJWK(candidates[0], algorithm=alg).key
    except jwt.PyJWTError as exc:
        raise OAuthError("invalid_client", "the registered key is unusable") from exc
    if isinstance(key, RSAPublicKey) and key.key_size >= MIN_RSA_BITS:
        return key
    if isinstance(key, EllipticCurvePublicKey):
        return key
    raise OAuthError("invalid_client", "the registered key is unusable")


def unverified_assertion_client_id(assertion: str) -> str:
    """The client the assertion claims to come from, to look its keys up; trusted only after verification."""
    try:
        claims = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise OAuthError("invalid_client", "client_assertion is not a JWT") from exc
    issuer = claims.get("iss")
    if not isinstance(issuer, str) or not issuer or claims.get("sub") != issuer:
        raise OAuthError("invalid_client", "client_assertion needs iss = sub = client_id")
    return issuer


def replay_key(client_id: str, jti: str) -> str:
    # Scoped per client so one client cannot burn another's identifiers; hashed to bound the column.
    return hashlib.sha256(f"{client_id}\x00{jti}".encode()).hexdigest()


async def verify_client_assertion(
    assertion: str,
    client: RegisteredClient,
    token_url: str,
    engine: AsyncEngine,
    *,
    jwks_fetcher: JwksFetcher | None = None,
) -> None:
    """Raises OAuthError("invalid_client") unless the assertion authenticates `client`."""
    try:
        header = jwt.get_unverified_header(assertion)
    except jwt.PyJWTError as exc:
        raise OAuthError("invalid_client", "client_assertion is not a JWT") from exc
    alg, kid = header.get("alg"), header.get("kid")
    if not isinstance(alg, str) or alg not in ASSERTION_ALGORITHMS:
        raise OAuthError("invalid_client", "client_assertion alg must be RS384 or ES384")
    if not isinstance(kid, str) or not kid:
        raise OAuthError("invalid_client", "client_assertion header needs a kid")
    key = await _find_key(client, kid, alg, jwks_fetcher)
    claims = _decode_assertion(assertion, key, alg, client.client_id, token_url)
    if not await remember_jti(
        engine, replay_key(client.client_id, claims["jti"]), _from_epoch(claims["exp"])
    ):
        raise OAuthError("invalid_client", "client_assertion jti was already used")


def _decode_assertion(
    assertion: str, key: RSAPublicKey | EllipticCurvePublicKey, alg: str, client_id: str, token_url: str
) -> dict[str, Any]:
    try:
        claims = jwt.decode(
            assertion,
            key,
            algorithms=[alg],
            audience=token_url,
            issuer=client_id,
            subject=client_id,
            leeway=CLOCK_SKEW_SECONDS,
            options={"require": ["iss", "sub", "aud", "exp", "jti"]},
        )
    except jwt.ExpiredSignatureError as exc:
        raise OAuthError("invalid_client", "client_assertion expired") from exc
    except jwt.InvalidAudienceError as exc:
        raise OAuthError("invalid_client", "client_assertion aud must be the token URL") from exc
    except jwt.PyJWTError as exc:
        raise OAuthError("invalid_client", "client_assertion not accepted") from exc
    exp, jti = claims["exp"], claims["jti"]
    if (
        not isinstance(exp, int | float)
        or exp > time.time() + MAX_ASSERTION_LIFETIME_SECONDS + CLOCK_SKEW_SECONDS
    ):
        raise OAuthError("invalid_client", "client_assertion exp must be at most 5 minutes ahead")
    if not isinstance(jti, str) or not 0 < len(jti) <= 255:
        raise OAuthError("invalid_client", "client_assertion jti must be a string of 1-255 characters")
    return claims


def _from_epoch(exp: float) -> datetime:
    return datetime.fromtimestamp(exp, UTC)

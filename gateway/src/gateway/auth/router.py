"""SMART discovery, the OAuth2 token endpoint (client_credentials), and per-request bearer authentication."""

import asyncio
import base64
import binascii
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, unquote_plus, urlsplit

import jwt
import orjson
from fastapi import APIRouter, Request, Response
from sqlalchemy.ext.asyncio import AsyncEngine

from fhirkit.errors import Unauthorized
from fhirkit.search.values import now_micros
from gateway.auth.clients import RegisteredClient, burn_secret_check, get_client, mark_used, verify_secret
from gateway.auth.external import ExternalIssuer, ExternalIssuerConfig
from gateway.auth.lockout import LockoutPolicy, locked_for, record_failure, record_success
from gateway.auth.scopes import ROLE_SCOPES, InvalidScope, ScopeSet
from gateway.auth.tokens import (
    ASSERTION_TYPE,
    DEFAULT_TOKEN_TTL_SECONDS,
    REALM,
    JwksFetcher,
    OAuthError,
    issue_access_token,
    unverified_assertion_client_id,
    verify_access_token,
    verify_client_assertion,
)
from servicekit.identity import CallerIdentity
from servicekit.observability import request_id_var
from servicekit.settings import AllianceSettings

DISCOVERY_PATH = "/fhir/.well-known/smart-configuration"
TOKEN_PATH = "/auth/token"
BREAK_GLASS_ROLE = ROLE_SCOPES["alliance/break-glass"]
AUDITOR_ROLE = ROLE_SCOPES["alliance/audit"]
MAX_FORM_BYTES = 16 * 1024
MIN_SIGNING_KEY_BYTES = 32
SCOPES_SUPPORTED = ("system/*.cruds", "system/*.rs", "system/*.read", "system/*.write", "system/*.*")
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


@dataclass(frozen=True, kw_only=True)
class AuthSettings:
    base_url: str  # e.g. http://127.0.0.1:8080/fhir; also the `iss` of access tokens
    signing_key: bytes = field(repr=False)
    token_url: str = ""  # defaults to the base URL's origin + /auth/token; also the assertion `aud`
    token_ttl_seconds: int = DEFAULT_TOKEN_TTL_SECONDS
    jwks_url_allow_list: tuple[str, ...] = ()
    client_cache_seconds: float = 5.0  # how long a disabled client's tokens may still pass
    external_issuer: ExternalIssuer | None = None  # an IdP whose access tokens are accepted too
    lockout: LockoutPolicy = field(default_factory=LockoutPolicy)

    @classmethod
    def from_settings(cls, settings: AllianceSettings, **overrides: Any) -> "AuthSettings":
        """The gateway's authentication as the `ALLIANCE_*` settings describe it."""
        values: dict[str, Any] = {
            "base_url": settings.base_url,
            "signing_key": settings.secret("token_signing_key"),
            "token_ttl_seconds": settings.access_token_ttl_seconds,
            "jwks_url_allow_list": tuple(settings.jwks_url_allow_list),
            "external_issuer": _external_issuer(settings),
            "lockout": LockoutPolicy(
                window_seconds=settings.auth_failure_window_seconds,
                max_failures_per_client=settings.auth_max_failures_per_client,
                max_failures_per_address=settings.auth_max_failures_per_address,
                lockout_seconds=settings.auth_lockout_seconds,
            ),
        }
        return cls(**(values | overrides))

    def __post_init__(self) -> None:
        if len(self.signing_key) < MIN_SIGNING_KEY_BYTES:
            raise ValueError(f"signing_key must be at least {MIN_SIGNING_KEY_BYTES} bytes")
        if not 0 < self.token_ttl_seconds <= 3600:
            raise ValueError("token_ttl_seconds must be between 1 and 3600")
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        if not self.token_url:
            origin = urlsplit(self.base_url)
            object.__setattr__(self, "token_url", f"{origin.scheme}://{origin.netloc}{TOKEN_PATH}")
        object.__setattr__(self, "jwks_url_allow_list", tuple(self.jwks_url_allow_list))


def _external_issuer(settings: AllianceSettings) -> ExternalIssuer | None:
    if not settings.external_issuer:
        if settings.external_jwks_url:
            raise ValueError("ALLIANCE_EXTERNAL_JWKS_URL is set but ALLIANCE_EXTERNAL_ISSUER is not")
        return None
    if not settings.external_jwks_url:
        raise ValueError("ALLIANCE_EXTERNAL_ISSUER needs ALLIANCE_EXTERNAL_JWKS_URL")
    if settings.environment == "production" and not settings.external_jwks_url.lower().startswith("https://"):
        raise ValueError("ALLIANCE_EXTERNAL_JWKS_URL must be https in production")
    return ExternalIssuer(
        ExternalIssuerConfig(
            issuer=settings.external_issuer,
            jwks_url=settings.external_jwks_url,
            audience=settings.external_audience or settings.base_url,
            organization_claim=settings.external_organization_claim,
            scope_claim=settings.external_scope_claim,
            client_claim=settings.external_client_claim,
            level_claim=settings.external_level_claim,
            jwks_cache_seconds=settings.external_jwks_cache_seconds,
            min_refetch_seconds=settings.external_jwks_min_refetch_seconds,
        )
    )


class Authenticated(NamedTuple):
    identity: CallerIdentity
    scopes: ScopeSet


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


def build_auth_router(
    *,
    get_engine: Callable[[Request], AsyncEngine],
    settings: AuthSettings,
    jwks_fetcher: JwksFetcher | None = None,
) -> APIRouter:
    router = APIRouter()
    fetcher = jwks_fetcher or JwksFetcher(settings.jwks_url_allow_list)
    discovery = _discovery_document(settings)

    @router.get(DISCOVERY_PATH, include_in_schema=False)
    async def smart_configuration() -> Response:
        return _json(200, discovery, {"Cache-Control": "public, max-age=3600"})

    @router.post(TOKEN_PATH, include_in_schema=False)
    async def token(request: Request) -> Response:
        attempt = _Attempt(address=request.client.host if request.client else None)
        try:
            body = await _token_response(request, get_engine(request), settings, fetcher, attempt)
        except OAuthError as exc:
            _audit(request, attempt, exc.status, f"{exc.error}: {exc.description}")
            return _error_response(request, exc)
        _audit(request, attempt, 200)
        return _json(200, body, dict(_NO_STORE))

    return router


def _discovery_document(settings: AuthSettings) -> dict[str, Any]:
    return {
        "token_endpoint": settings.token_url,
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": [
            "private_key_jwt",
            "client_secret_basic",
            "client_secret_post",
        ],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "scopes_supported": list(SCOPES_SUPPORTED),
        "capabilities": [
            "client-confidential-asymmetric",
            "client-confidential-symmetric",
            "permission-v1",
            "permission-v2",
        ],
        # SMART 2.x lists this as required; there is no authorize endpoint, but S256-only is the true answer.
        "code_challenge_methods_supported": ["S256"],
    }


# --- token endpoint --------------------------------------------------------------------------------


@dataclass
class _Attempt:
    """What the audit records of one token request: never the secret or the assertion."""

    address: str | None
    client_id: str | None = None  # as claimed; verified only when `client` is set and it succeeded
    method: str | None = None
    client: RegisteredClient | None = None  # the registered client the request claimed to be
    scope: str | None = None


@dataclass(frozen=True)
class _Credentials:
    method: str
    client_id: str
    secret: str | None = field(default=None, repr=False)
    assertion: str | None = field(default=None, repr=False)


def _error_response(request: Request, exc: OAuthError) -> Response:
    headers = dict(_NO_STORE)
    if exc.status == 401 and _basic_credentials_header(request) is not None:
        headers["WWW-Authenticate"] = f'Basic realm="{REALM}"'
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    return _json(exc.status, {"error": exc.error, "error_description": exc.description}, headers)


def _audit(request: Request, attempt: _Attempt, status: int, description: str | None = None) -> None:
    trail = getattr(request.app.state, "audit", None)
    if trail is None:
        return
    # Imported here: gateway.audit imports this package (through audit_chain), not the other way round.
    from gateway.audit import TokenRequestNote

    client = attempt.client
    trail.note(
        TokenRequestNote(
            client_id=client.client_id if client else attempt.client_id,
            organization=client.organization if client else "",
            status=status,
            recorded=now_micros(),
            auth_method=attempt.method,
            address=attempt.address,
            request_id=request_id_var.get(),
            description=description,
            scope=attempt.scope,
        )
    )


async def _token_response(
    request: Request, engine: AsyncEngine, settings: AuthSettings, fetcher: JwksFetcher, attempt: _Attempt
) -> dict[str, Any]:
    form = await _read_form(request)
    grant_type = form.get("grant_type")
    if not grant_type:
        raise OAuthError("invalid_request", "grant_type is required")
    if grant_type != "client_credentials":
        raise OAuthError("unsupported_grant_type", "only client_credentials is supported")
    client = await _authenticate_counted(request, form, engine, settings, fetcher, attempt)
    if not (form.get("scope") or "").strip():
        raise OAuthError("invalid_scope", "scope is required")
    try:
        granted = ScopeSet.parse(client.scope).narrow(form["scope"])
    except InvalidScope as exc:
        raise OAuthError("invalid_scope", str(exc)) from exc
    scope = str(granted)
    access_token, expires_in = issue_access_token(
        client_id=client.client_id,
        organization=client.organization,
        level=client.level,
        scope=scope,
        key=settings.signing_key,
        issuer=settings.base_url,
        ttl_seconds=settings.token_ttl_seconds,
    )
    attempt.scope = scope
    await mark_used(engine, client.client_id)
    return {"access_token": access_token, "token_type": "Bearer", "expires_in": expires_in, "scope": scope}


async def _read_form(request: Request) -> dict[str, str]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise OAuthError("invalid_request", "the body must be application/x-www-form-urlencoded")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise OAuthError("invalid_request", "request body too large")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError) as exc:
        raise OAuthError("invalid_request", "malformed form body") from exc
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:  # RFC 6749 §3.2: parameters MUST NOT be repeated
            raise OAuthError("invalid_request", f"parameter {name} repeated")
        form[name] = value
    return form


def _basic_credentials_header(request: Request) -> str | None:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "basic" else None


def _parse_basic(credentials: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise OAuthError("invalid_client", "malformed Basic credentials") from exc
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise OAuthError("invalid_client", "malformed Basic credentials")
    # RFC 6749 §2.3.1: both halves are form-urlencoded before being joined.
    return unquote_plus(client_id), unquote_plus(secret)


async def _authenticate_counted(
    request: Request,
    form: dict[str, str],
    engine: AsyncEngine,
    settings: AuthSettings,
    fetcher: JwksFetcher,
    attempt: _Attempt,
) -> RegisteredClient:
    """Authenticate the client unless its id or the source address is locked out; count failures."""
    policy = settings.lockout
    limits = policy.limits(None, attempt.address)
    try:
        attempt.method = _method(request, form)
        credentials = _credentials(attempt.method, request, form)
        attempt.client_id = credentials.client_id
        limits = policy.limits(credentials.client_id, attempt.address)
        locked = await locked_for(engine, policy, [key for key, _ in limits])
        if locked:
            # Checked before the credentials, so that even the right secret waits the lockout out.
            raise OAuthError(
                "temporarily_unavailable",
                "too many failed client authentications; retry later",
                status=429,
                retry_after=locked,
            )
        client = await _verify(credentials, form, engine, settings, fetcher, attempt)
    except OAuthError as exc:
        if exc.error == "invalid_client":
            await record_failure(engine, policy, limits)
        raise
    await record_success(engine, policy, client.client_id)
    return client


def _method(request: Request, form: dict[str, str]) -> str:
    basic = _basic_credentials_header(request) is not None
    uses_assertion = "client_assertion" in form or "client_assertion_type" in form
    if sum([basic, "client_secret" in form, uses_assertion]) > 1:
        raise OAuthError("invalid_request", "use exactly one client authentication method")
    if basic:
        return "client_secret_basic"
    if "client_secret" in form:
        return "client_secret_post"
    if uses_assertion:
        return "private_key_jwt"
    raise OAuthError("invalid_client", "client authentication is required")


def _credentials(method: str, request: Request, form: dict[str, str]) -> _Credentials:
    """The credentials as sent; nothing in them is trusted yet."""
    if method == "client_secret_basic":
        client_id, secret = _parse_basic(_basic_credentials_header(request) or "")
        return _Credentials(method, client_id, secret=secret)
    if method == "client_secret_post":
        return _Credentials(method, form.get("client_id", ""), secret=form["client_secret"])
    if form.get("client_assertion_type") != ASSERTION_TYPE:
        raise OAuthError("invalid_request", f"client_assertion_type must be {ASSERTION_TYPE}")
    assertion = form.get("client_assertion", "")
    if not assertion:
        raise OAuthError("invalid_request", "client_assertion is required")
    return _Credentials(method, unverified_assertion_client_id(assertion), assertion=assertion)


async def _verify(
    credentials: _Credentials,
    form: dict[str, str],
    engine: AsyncEngine,
    settings: AuthSettings,
    fetcher: JwksFetcher,
    attempt: _Attempt,
) -> RegisteredClient:
    if credentials.assertion is not None:
        client = await _assertion_client(credentials, engine, settings, fetcher, attempt)
    else:
        client = await _secret_client(engine, credentials.client_id, credentials.secret or "", attempt)
    if form.get("client_id", client.client_id) != client.client_id:
        raise OAuthError("invalid_client", "client_id does not match the authenticated client")
    return client


async def _secret_client(engine: AsyncEngine, client_id: str, secret: str, attempt: _Attempt) -> RegisteredClient:
    client = await get_client(engine, client_id) if client_id else None
    if client is None:
        await asyncio.to_thread(burn_secret_check, secret)
        raise OAuthError("invalid_client", "client authentication failed")
    attempt.client = client
    # One message for wrong secret and disabled client: neither tells an attacker which one it was.
    if not await asyncio.to_thread(verify_secret, client, secret) or not client.enabled:
        raise OAuthError("invalid_client", "client authentication failed")
    return client


async def _assertion_client(
    credentials: _Credentials, engine: AsyncEngine, settings: AuthSettings, fetcher: JwksFetcher, attempt: _Attempt
) -> RegisteredClient:
    assert credentials.assertion is not None
    client = await get_client(engine, credentials.client_id)
    attempt.client = client
    if client is None or not client.enabled:
        raise OAuthError("invalid_client", "client authentication failed")
    await verify_client_assertion(credentials.assertion, client, settings.token_url, engine, jwks_fetcher=fetcher)
    return client


# --- bearer authentication on every FHIR request ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class _ClientStatus:
    organization: str
    level: str | None
    scope: str
    enabled: bool


class _ClientStatusCache:
    """Per-engine cache of the registry, so that every request does not hit the database."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, _ClientStatus | None]] = {}

    async def lookup(self, engine: AsyncEngine, client_id: str, max_age: float) -> _ClientStatus | None:
        now = time.monotonic()
        entry = self._entries.get(client_id)
        if entry is not None and now - entry[0] < max_age:
            return entry[1]
        client = await get_client(engine, client_id)
        status = (
            None
            if client is None
            else _ClientStatus(client.organization, client.level, client.scope, client.enabled)
        )
        self._entries[client_id] = (now, status)
        return status


_CACHES: "weakref.WeakKeyDictionary[AsyncEngine, _ClientStatusCache]" = weakref.WeakKeyDictionary()


@lru_cache(maxsize=4096)
def _effective_scopes(token_scope: str, registered_scope: str) -> ScopeSet:
    # Re-narrowing against the current registration makes a scope withdrawal bite within the cache window.
    return ScopeSet.parse(registered_scope).narrow(token_scope)


def _challenge(error: str | None = None) -> dict[str, str]:
    value = f'Bearer realm="{REALM}"'
    if error:
        value += f', error="{error}"'
    return {"WWW-Authenticate": value}


def _bearer_token(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("a Bearer access token is required", headers=_challenge())
    return token


async def authenticate(request: Request, *, engine: AsyncEngine, settings: AuthSettings) -> Authenticated:
    """Raises fhirkit.errors.Unauthorized (with a Bearer challenge) when the request is not authenticated."""
    token = _bearer_token(request)
    if settings.external_issuer is not None and not _own_algorithm(token):
        identity, scopes = await settings.external_issuer.authenticate(token)
        return Authenticated(identity, scopes)
    claims = verify_access_token(token, settings.signing_key, issuer=settings.base_url)
    cache = _CACHES.get(engine)
    if cache is None:
        cache = _CACHES.setdefault(engine, _ClientStatusCache())
    status = await cache.lookup(engine, claims["sub"], settings.client_cache_seconds)
    invalid = _challenge("invalid_token")
    if status is None or not status.enabled:
        raise Unauthorized("the client is unknown or disabled", headers=invalid)
    if status.organization != claims["org"]:
        raise Unauthorized("the client's organization changed; request a new token", headers=invalid)
    try:
        scopes = _effective_scopes(claims["scope"], status.scope)
    except InvalidScope as exc:
        raise Unauthorized("the token's scopes are no longer granted", headers=invalid) from exc
    identity = CallerIdentity(
        client_id=claims["sub"],
        organization=status.organization,
        scopes=scopes.strings(),
        level=status.level,
        roles=tuple(role for scope, role in ROLE_SCOPES.items() if scope in scopes.extras),
    )
    return Authenticated(identity, scopes)


def _own_algorithm(token: str) -> bool:
    """Our tokens are HS256; anything else can only be the external issuer's (or nobody's).

    An HS256 token is never handed to the external issuer, so its public key can never serve as an
    HMAC secret; a token we cannot parse goes our way and fails there."""
    try:
        return jwt.get_unverified_header(token).get("alg") == "HS256"
    except jwt.PyJWTError:
        return True

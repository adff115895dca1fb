"""The caller identity the gateway forwards to services, as a short-lived HS256 JWT.

Services never trust client headers: the gateway authenticates the client, then puts this signed
token in `X-Alliance-Identity`. Verification runs on every request, so it is done by hand with
hmac + orjson rather than through a general JWT library: the header segment must be byte-for-byte
the one we emit, which also rules out algorithm confusion. The output is still a standard JWT.
"""

import base64
import binascii
import hashlib
import hmac
import time
from dataclasses import dataclass
from typing import Any

import orjson

from fhirkit.errors import Unauthorized

IDENTITY_HEADER = "X-Alliance-Identity"
# The ASGI scope extension that carries a caller's identity from the gateway (or a sibling service)
# to a service app called in the same process (servicekit.inprocess). Extensions are set by the
# code that builds the scope, never from the request's bytes, so no client can forge one; signing
# and verifying the header there cost a check about 2 % of its CPU and proved nothing.
IN_PROCESS_CALLER = "alliance.caller"
IDENTITY_AUDIENCE = "alliance-internal"
CLOCK_SKEW_SECONDS = 5
MIN_SECRET_BYTES = 32

_HEADER_SEGMENT = (
    base64.urlsafe_b64encode(orjson.dumps({"alg": "HS256", "typ": "JWT"})).rstrip(b"=").decode("ascii")
)
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="alliance-internal", error="invalid_token"'}


@dataclass(frozen=True, slots=True)
class CallerIdentity:
    client_id: str
    organization: str  # "Organization/123"
    scopes: tuple[str, ...]
    level: str | None
    roles: tuple[str, ...] = ()
    # The stated reason of an emergency read outside the normal access rules (break-the-glass).
    break_glass: str | None = None


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _mac(signing_input: bytes, secret: bytes) -> bytes:
    return hmac.new(secret, signing_input, hashlib.sha256).digest()


def _check_secret(secret: bytes) -> None:
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"identity secret must be at least {MIN_SECRET_BYTES} bytes")


def sign_identity(
    identity: CallerIdentity, secret: bytes, *, ttl_seconds: int = 60, request_id: str | None = None
) -> str:
    _check_secret(secret)
    now = int(time.time())
    claims: dict[str, Any] = {
        "aud": IDENTITY_AUDIENCE,
        "sub": identity.client_id,
        "org": identity.organization,
        "scope": list(identity.scopes),
        "level": identity.level,
        "roles": list(identity.roles),
        "btg": identity.break_glass,
        "iat": now,
        "exp": now + ttl_seconds,
    }
    if request_id is not None:
        claims["rid"] = request_id
    signing_input = f"{_HEADER_SEGMENT}.{_b64encode(orjson.dumps(claims))}"
    return f"{signing_input}.{_b64encode(_mac(signing_input.encode('ascii'), secret))}"


def decode_identity(token: str, secret: bytes) -> tuple[CallerIdentity, str | None]:
    """The identity and the request id it was signed for; Unauthorized on anything wrong."""
    claims = _verified_claims(token, secret)
    try:
        identity = CallerIdentity(
            client_id=_str(claims["sub"]),
            organization=_str(claims["org"]),
            scopes=_str_tuple(claims["scope"]),
            level=_optional_str(claims["level"]),
            roles=_str_tuple(claims.get("roles", [])),
            break_glass=_optional_str(claims.get("btg")),
        )
        request_id = _optional_str(claims.get("rid"))
    except (KeyError, TypeError) as exc:
        raise Unauthorized("internal identity is missing claims", headers=_CHALLENGE) from exc
    return identity, request_id


def verify_identity(token: str, secret: bytes) -> CallerIdentity:
    return decode_identity(token, secret)[0]


def _verified_claims(token: str, secret: bytes) -> dict[str, Any]:
    header, _, rest = token.partition(".")
    payload, _, signature = rest.partition(".")
    if header != _HEADER_SEGMENT or not payload or not signature or "." in signature:
        raise Unauthorized("malformed internal identity", headers=_CHALLENGE)
    try:
        expected = _b64encode(_mac(f"{header}.{payload}".encode("ascii"), secret)).encode("ascii")
    except UnicodeEncodeError as exc:
        raise Unauthorized("malformed internal identity", headers=_CHALLENGE) from exc
    # Comparing the encoded segment refuses the alternative base64 spellings of one signature.
    if not hmac.compare_digest(signature.encode("utf-8", "replace"), expected):
        raise Unauthorized("internal identity signature mismatch", headers=_CHALLENGE)
    try:
        claims = orjson.loads(_b64decode(payload))
    except (binascii.Error, ValueError) as exc:
        raise Unauthorized("malformed internal identity", headers=_CHALLENGE) from exc
    if not isinstance(claims, dict) or claims.get("aud") != IDENTITY_AUDIENCE:
        raise Unauthorized("internal identity has the wrong audience", headers=_CHALLENGE)
    exp = claims.get("exp")
    if not isinstance(exp, int) or isinstance(exp, bool) or exp + CLOCK_SKEW_SECONDS < time.time():
        raise Unauthorized("internal identity expired", headers=_CHALLENGE)
    return claims


def _str(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError("expected a non-empty string")
    return value


def _optional_str(value: object) -> str | None:
    return None if value is None else _str(value)


def _str_tuple(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise TypeError("expected a list")
    return tuple(_str(v) for v in value)

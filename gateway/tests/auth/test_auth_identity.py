import base64
import time

import jwt
import orjson
import pytest

from fhirkit.errors import Unauthorized
from servicekit.identity import (
    IDENTITY_HEADER,
    CallerIdentity,
    decode_identity,
    sign_identity,
    verify_identity,
)

SECRET = b"s" * 32
IDENTITY = CallerIdentity(
    client_id="county-his",
    organization="Organization/county-hospital",
    scopes=("system/*.rs", "system/Task.cru"),
    level="county",
    roles=("clinician",),
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_header_name() -> None:
    assert IDENTITY_HEADER == "X-Alliance-Identity"


def test_round_trip() -> None:
    token = sign_identity(IDENTITY, SECRET, request_id="req-1")
    assert verify_identity(token, SECRET) == IDENTITY
    assert decode_identity(token, SECRET) == (IDENTITY, "req-1")


def test_round_trip_without_level_roles_or_request_id() -> None:
    identity = CallerIdentity("c", "Organization/1", ("system/Patient.rs",), None)
    assert decode_identity(sign_identity(identity, SECRET), SECRET) == (identity, None)


def test_is_a_standard_jwt() -> None:
    claims = jwt.decode(
        sign_identity(IDENTITY, SECRET), SECRET, algorithms=["HS256"], audience="alliance-internal"
    )
    assert claims["sub"] == "county-his"
    assert claims["exp"] - claims["iat"] == 60


def test_wrong_secret() -> None:
    with pytest.raises(Unauthorized):
        verify_identity(sign_identity(IDENTITY, SECRET), b"x" * 32)


def test_tampered_payload() -> None:
    header, payload, signature = sign_identity(IDENTITY, SECRET).split(".")
    claims = orjson.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["org"] = "Organization/someone-else"
    with pytest.raises(Unauthorized):
        verify_identity(f"{header}.{_b64(orjson.dumps(claims))}.{signature}", SECRET)


def test_tampered_signature_and_shape() -> None:
    token = sign_identity(IDENTITY, SECRET)
    header, payload, signature = token.split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    for bad in (
        f"{header}.{payload}.{flipped}",
        f"{header}.{payload}",
        token + ".x",
        "",
        "a.b.c",
        token + "é",
    ):
        with pytest.raises(Unauthorized):
            verify_identity(bad, SECRET)


def test_other_algorithms_refused() -> None:
    claims = {
        "aud": "alliance-internal",
        "sub": "c",
        "org": "Organization/1",
        "scope": [],
        "level": None,
        "exp": int(time.time()) + 60,
    }
    unsigned = jwt.encode(claims, None, algorithm="none")
    hs512 = jwt.encode(claims, SECRET * 2, algorithm="HS512")
    for token in (unsigned, hs512):
        with pytest.raises(Unauthorized):
            verify_identity(token, SECRET)


def test_expired() -> None:
    with pytest.raises(Unauthorized, match="expired"):
        verify_identity(sign_identity(IDENTITY, SECRET, ttl_seconds=-10), SECRET)


def test_wrong_audience() -> None:
    claims = {
        "aud": "someone-else",
        "sub": "c",
        "org": "Organization/1",
        "scope": [],
        "level": None,
        "exp": int(time.time()) + 60,
    }
    with pytest.raises(Unauthorized, match="audience"):
        verify_identity(jwt.encode(claims, SECRET, algorithm="HS256"), SECRET)


@pytest.mark.parametrize("missing", ["sub", "org", "scope", "level"])
def test_missing_claims(missing: str) -> None:
    claims = {
        "aud": "alliance-internal",
        "sub": "c",
        "org": "Organization/1",
        "scope": ["system/*.rs"],
        "level": None,
        "exp": int(time.time()) + 60,
    }
    del claims[missing]
    with pytest.raises(Unauthorized, match="missing"):
        verify_identity(jwt.encode(claims, SECRET, algorithm="HS256"), SECRET)


def test_short_secret_refused_at_signing() -> None:
    with pytest.raises(ValueError):
        sign_identity(IDENTITY, b"short")

import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from gateway.auth.clients import METADATA

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _postgres_available() -> bool:
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    if not _postgres_available():
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432")
    name = f"auth_test_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _fresh_engine(url: str) -> AsyncEngine:
    engine = create_async_engine(url)
    async with engine.begin() as conn:
        await conn.run_sync(METADATA.drop_all)
        await conn.run_sync(METADATA.create_all)
    return engine


@pytest.fixture(params=["sqlite", "postgresql"])
async def engine(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[AsyncEngine]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path}/auth-{uuid.uuid4().hex}.db"
    else:
        url = request.getfixturevalue("postgres_url")
    engine = await _fresh_engine(url)
    try:
        yield engine
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(METADATA.drop_all)
        await engine.dispose()


@pytest.fixture
async def sqlite_engine(tmp_path: Any) -> AsyncIterator[AsyncEngine]:
    engine = await _fresh_engine(f"sqlite+aiosqlite:///{tmp_path}/auth-{uuid.uuid4().hex}.db")
    try:
        yield engine
    finally:
        await engine.dispose()


# --- keys and client assertions ----------------------------------------------------------------


@dataclass(frozen=True)
class SigningKey:
    alg: str
    kid: str
    private_key: Any
    public_jwk: dict[str, Any]


def _signing_key(alg: str, kid: str) -> SigningKey:
    if alg.startswith("RS"):
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    else:
        curve = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}[alg]
        private = ec.generate_private_key(curve)
        jwk = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    return SigningKey(alg, kid, private, {**jwk, "kid": kid, "alg": alg, "use": "sig"})


@pytest.fixture(scope="session")
def new_signing_key() -> Callable[[str, str], SigningKey]:
    """Make a key pair: `new_signing_key("RS384", "kid-1")`."""
    return _signing_key


@pytest.fixture(scope="session")
def rs384_key() -> SigningKey:
    return _signing_key("RS384", "rsa-1")


@pytest.fixture(scope="session")
def es384_key() -> SigningKey:
    return _signing_key("ES384", "ec-1")


AssertionFactory = Callable[..., str]


@pytest.fixture
def make_assertion() -> AssertionFactory:
    def make(key: SigningKey, client_id: str, aud: str, *, kid: str | None = None, **claims: Any) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": client_id,
            "sub": client_id,
            "aud": aud,
            "exp": now + 240,
            "jti": uuid.uuid4().hex,
        }
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        headers = {"kid": kid if kid is not None else key.kid, "typ": "JWT"}
        return jwt.encode(payload, key.private_key, algorithm=key.alg, headers=headers)

    return make

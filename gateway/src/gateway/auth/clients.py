"""Registered API clients and the assertion `jti` replay table, in SQL.

Secrets are stored only as salted scrypt hashes. scrypt is slow on purpose (tens of ms), so the
token endpoint runs `verify_secret` in a worker thread.
"""

import asyncio
import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Index,
    MetaData,
    String,
    Table,
    Text,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.auth.scopes import ScopeSet

METADATA = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

gateway_client = Table(
    "gateway_client",
    METADATA,
    Column("client_id", String(128), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("organization", String(128), nullable=False),
    Column("level", String(32), nullable=True),
    Column("scope", Text, nullable=False),
    Column("secret_hash", String(255), nullable=True),
    Column("jwks", Text, nullable=True),
    Column("jwks_url", Text, nullable=True),
    Column("enabled", Boolean, nullable=False, default=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_used_at", DateTime(timezone=True), nullable=True),  # the last token issued
)

gateway_token_jti = Table(
    "gateway_token_jti",
    METADATA,
    Column("jti", String(255), primary_key=True),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Index(None, "expires_at"),
)

_CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9._~-]{1,128}$")
_ORGANIZATION_RE = re.compile(r"^Organization/[A-Za-z0-9\-.]{1,64}$")
# N=2^14, r=8 costs ~16 MiB and a few tens of ms: fine for a token endpoint, ruinous for guessing.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
_DUMMY_HASH: str | None = None


@dataclass(frozen=True, slots=True)
class RegisteredClient:
    client_id: str
    name: str
    organization: str
    level: str | None
    scope: str
    jwks: dict[str, Any] | None
    jwks_url: str | None
    enabled: bool
    created_at: datetime
    secret_hash: str | None = field(default=None, repr=False)
    client_secret: str | None = field(default=None, repr=False)  # plain text, only from create_client
    last_used_at: datetime | None = None

    @property
    def scopes(self) -> ScopeSet:
        return ScopeSet.parse(self.scope)

    @property
    def auth_methods(self) -> tuple[str, ...]:
        methods = ("private_key_jwt",) if self.jwks is not None or self.jwks_url else ()
        return methods + (("client_secret",) if self.secret_hash is not None else ())


def hash_secret(secret: str) -> str:
    salt = secrets.token_bytes(16)
    digest = _scrypt(secret, salt, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P)
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_secret(client: RegisteredClient, secret: str) -> bool:
    if client.secret_hash is None:
        # Burn the same time as a real check so that "has no secret" is not observable.
        _verify_hash(_dummy_hash(), secret)
        return False
    return _verify_hash(client.secret_hash, secret)


def burn_secret_check(secret: str) -> None:
    """Spend the time of one secret check; used for unknown clients so that they cannot be enumerated."""
    _verify_hash(_dummy_hash(), secret)


def _verify_hash(stored: str, secret: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.urlsafe_b64decode(digest)
        actual = _scrypt(secret, base64.urlsafe_b64decode(salt), int(n), int(r), int(p))
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


def _scrypt(secret: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(secret.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32, maxmem=64 * 1024 * 1024)


def _dummy_hash() -> str:
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = hash_secret(secrets.token_urlsafe(32))
    return _DUMMY_HASH


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii")


def _validate_registration(
    client_id: str, organization: str, scope: str, jwks: dict[str, Any] | None
) -> None:
    if not _CLIENT_ID_RE.match(client_id):
        raise ValueError("client_id must be 1-128 characters of [A-Za-z0-9._~-]")
    if not _ORGANIZATION_RE.match(organization):
        raise ValueError("organization must be a reference like 'Organization/123'")
    if not ScopeSet.parse(scope, strict=True):
        raise ValueError("a client needs at least one resource scope")
    if jwks is not None:
        _validate_jwks(jwks)


def _validate_jwks(jwks: Any) -> None:
    if not (isinstance(jwks, dict) and isinstance(jwks.get("keys"), list)):
        raise ValueError("jwks must be a JWK Set: {'keys': [...]}")
    if any(not isinstance(k, dict) or "d" in k for k in jwks["keys"]):
        raise ValueError("jwks must hold public keys only")


async def create_client(
    engine: AsyncEngine,
    *,
    organization: str,
    scope: str,
    name: str,
    level: str | None,
    jwks: dict[str, Any] | None = None,
    jwks_url: str | None = None,
    client_id: str | None = None,
    client_secret: str | None = None,
) -> RegisteredClient:
    """Register or update a client; the returned `client_secret` is the only time the plain secret exists.

    A secret is generated for clients without keys (symmetric auth). Re-registering an existing
    client_id without a secret keeps its current secret and its enabled flag.
    """
    # Hex, not URL-safe base64: an id starting with '-' would read as an option on the command line.
    client_id = client_id or secrets.token_hex(16)
    _validate_registration(client_id, organization, scope, jwks)
    if client_secret is not None and len(client_secret) < 8:
        raise ValueError("client_secret must be at least 8 characters")
    scope = str(ScopeSet.parse(scope, strict=True))
    plain = client_secret
    given_hash = await asyncio.to_thread(hash_secret, plain) if plain is not None else None
    async with engine.begin() as conn:
        existing = await _fetch(conn, client_id)
        secret_hash = given_hash or (existing.secret_hash if existing else None)
        if secret_hash is None and jwks is None and jwks_url is None:
            # A client with neither keys nor a secret could never authenticate.
            plain = secrets.token_urlsafe(32)
            secret_hash = await asyncio.to_thread(hash_secret, plain)
        values = {
            "name": name,
            "organization": organization,
            "level": level,
            "scope": scope,
            "secret_hash": secret_hash,
            "jwks": orjson.dumps(jwks).decode() if jwks is not None else None,
            "jwks_url": jwks_url,
        }
        if existing is None:
            values |= {"client_id": client_id, "enabled": True, "created_at": datetime.now(UTC)}
            await conn.execute(insert(gateway_client).values(**values))
        else:
            await conn.execute(
                update(gateway_client).where(gateway_client.c.client_id == client_id).values(**values)
            )
        stored = await _fetch(conn, client_id)
    assert stored is not None
    return replace(stored, client_secret=plain)


async def get_client(engine: AsyncEngine, client_id: str) -> RegisteredClient | None:
    if not _CLIENT_ID_RE.match(client_id):
        return None
    async with engine.connect() as conn:
        return await _fetch(conn, client_id)


async def set_enabled(engine: AsyncEngine, client_id: str, enabled: bool) -> bool:
    """False when there is no such client."""
    async with engine.begin() as conn:
        result = await conn.execute(
            update(gateway_client).where(gateway_client.c.client_id == client_id).values(enabled=enabled)
        )
    return result.rowcount > 0


async def list_clients(engine: AsyncEngine) -> list[RegisteredClient]:
    async with engine.connect() as conn:
        rows = await conn.execute(select(gateway_client).order_by(gateway_client.c.created_at, gateway_client.c.client_id))
        return [_client(row) for row in rows]


async def rotate_secret(engine: AsyncEngine, client_id: str) -> str | None:
    """Replace the client's secret; the new plain secret is returned once, the old one stops working.

    None when there is no such client. A client that authenticates only with keys gets no secret:
    rotating would add a weaker way in.
    """
    client = await get_client(engine, client_id)
    if client is None:
        return None
    if client.secret_hash is None:
        raise ValueError("the client authenticates with private_key_jwt only; replace its keys with set-jwks")
    plain = secrets.token_urlsafe(32)
    secret_hash = await asyncio.to_thread(hash_secret, plain)
    async with engine.begin() as conn:
        await conn.execute(
            update(gateway_client).where(gateway_client.c.client_id == client_id).values(secret_hash=secret_hash)
        )
    return plain


async def set_jwks(engine: AsyncEngine, client_id: str, jwks: Any) -> bool:
    """Replace the client's registered JWK Set; False when there is no such client."""
    _validate_jwks(jwks)
    if not jwks["keys"]:
        raise ValueError("jwks must hold at least one key")
    async with engine.begin() as conn:
        result = await conn.execute(
            update(gateway_client)
            .where(gateway_client.c.client_id == client_id)
            .values(jwks=orjson.dumps(jwks).decode())
        )
    return result.rowcount > 0


async def mark_used(engine: AsyncEngine, client_id: str) -> None:
    """Note that the client was just issued a token (for `alliance client list`)."""
    async with engine.begin() as conn:
        await conn.execute(
            update(gateway_client)
            .where(gateway_client.c.client_id == client_id)
            .values(last_used_at=datetime.now(UTC))
        )


async def _fetch(conn: AsyncConnection, client_id: str) -> RegisteredClient | None:
    row = (await conn.execute(select(gateway_client).where(gateway_client.c.client_id == client_id))).first()
    return None if row is None else _client(row)


def _client(row: Any) -> RegisteredClient:
    return RegisteredClient(
        client_id=row.client_id,
        name=row.name,
        organization=row.organization,
        level=row.level,
        scope=row.scope,
        jwks=orjson.loads(row.jwks) if row.jwks else None,
        jwks_url=row.jwks_url,
        enabled=bool(row.enabled),
        created_at=_utc(row.created_at),
        secret_hash=row.secret_hash,
        last_used_at=_utc(row.last_used_at) if row.last_used_at is not None else None,
    )


def _utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything stored here is UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


async def remember_jti(engine: AsyncEngine, jti: str, expires_at: datetime) -> bool:
    """Record a one-time identifier; False when it was already recorded (a replay)."""
    if len(jti) > 255:
        raise ValueError("jti longer than 255 characters")
    expires_at = _utc(expires_at).astimezone(UTC)
    async with engine.begin() as conn:
        fresh = await _insert_once(conn, jti, expires_at)
        # Rows past their expiry are useless: an expired assertion is refused before its jti is checked.
        await conn.execute(
            delete(gateway_token_jti).where(gateway_token_jti.c.expires_at < datetime.now(UTC))
        )
    return fresh


async def _insert_once(conn: AsyncConnection, jti: str, expires_at: datetime) -> bool:
    values = {"jti": jti, "expires_at": expires_at}
    dialect = conn.dialect.name
    if dialect in ("postgresql", "sqlite"):
        dialect_insert = pg_insert if dialect == "postgresql" else sqlite_insert
        stmt = (
            dialect_insert(gateway_token_jti)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["jti"])
            .returning(gateway_token_jti.c.jti)
        )
        # RETURNING, not rowcount: drivers disagree on rowcount for ON CONFLICT DO NOTHING.
        return (await conn.execute(stmt)).first() is not None
    try:
        async with conn.begin_nested():
            await conn.execute(insert(gateway_token_jti).values(**values))
    except IntegrityError:
        return False
    return True


async def purge_expired_jtis(engine: AsyncEngine) -> int:
    async with engine.begin() as conn:
        result = await conn.execute(
            delete(gateway_token_jti).where(gateway_token_jti.c.expires_at < datetime.now(UTC))
        )
    return result.rowcount

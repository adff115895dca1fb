from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.auth.clients import (
    RegisteredClient,
    create_client,
    gateway_client,
    gateway_token_jti,
    get_client,
    purge_expired_jtis,
    remember_jti,
    set_enabled,
    verify_secret,
)

JWKS = {"keys": [{"kty": "EC", "crv": "P-384", "kid": "k1", "x": "AAAA", "y": "BBBB"}]}


async def _register(engine: AsyncEngine, **overrides: object) -> RegisteredClient:
    args: dict[str, object] = {
        "organization": "Organization/township-1",
        "scope": "system/Patient.rs system/Task.cru",
        "name": "Township clinic HIS",
        "level": "township",
    }
    args.update(overrides)
    return await create_client(engine, **args)  # type: ignore[arg-type]


async def test_create_and_get(engine: AsyncEngine) -> None:
    created = await _register(engine)
    assert created.client_secret and len(created.client_secret) >= 43
    fetched = await get_client(engine, created.client_id)
    assert fetched is not None
    assert fetched.client_secret is None
    assert (fetched.organization, fetched.level, fetched.enabled) == (
        "Organization/township-1",
        "township",
        True,
    )
    assert fetched.scope == "system/Patient.rs system/Task.cru"
    assert fetched.created_at.tzinfo is not None
    assert await get_client(engine, "nobody") is None
    assert await get_client(engine, "bad id with spaces") is None


async def test_secret_is_stored_hashed_and_verifies(engine: AsyncEngine) -> None:
    created = await _register(engine)
    assert created.client_secret is not None
    async with engine.connect() as conn:
        stored = (await conn.execute(select(gateway_client.c.secret_hash))).scalar_one()
    assert created.client_secret not in stored
    assert stored.startswith("scrypt$")
    fetched = await get_client(engine, created.client_id)
    assert fetched is not None
    assert verify_secret(fetched, created.client_secret)
    assert not verify_secret(fetched, created.client_secret + "x")
    assert not verify_secret(fetched, "")


async def test_same_secret_gets_different_salts(engine: AsyncEngine) -> None:
    a = await _register(engine, client_id="a", client_secret="same-secret")
    b = await _register(engine, client_id="b", client_secret="same-secret")
    assert a.secret_hash != b.secret_hash


async def test_explicit_id_and_secret_are_reproducible(engine: AsyncEngine) -> None:
    first = await _register(engine, client_id="demo-county", client_secret="demo-secret")
    second = await _register(
        engine, client_id="demo-county", client_secret="demo-secret", scope="system/*.rs"
    )
    assert first.client_id == second.client_id == "demo-county"
    fetched = await get_client(engine, "demo-county")
    assert fetched is not None
    assert fetched.scope == "system/*.rs"
    assert fetched.created_at == first.created_at
    assert verify_secret(fetched, "demo-secret")


async def test_reregistration_without_secret_keeps_secret_and_enabled_flag(engine: AsyncEngine) -> None:
    first = await _register(engine, client_id="c1")
    assert first.client_secret is not None
    await set_enabled(engine, "c1", False)
    again = await _register(engine, client_id="c1", name="Renamed")
    assert again.client_secret is None
    assert again.name == "Renamed"
    assert again.enabled is False
    assert verify_secret(again, first.client_secret)


async def test_key_only_client_has_no_secret(engine: AsyncEngine) -> None:
    created = await _register(engine, jwks=JWKS)
    assert created.client_secret is None
    assert created.jwks == JWKS
    assert not verify_secret(created, "anything")
    by_url = await _register(engine, jwks_url="https://his.example/jwks.json")
    assert by_url.client_secret is None and by_url.jwks_url == "https://his.example/jwks.json"


async def test_set_enabled(engine: AsyncEngine) -> None:
    created = await _register(engine)
    assert await set_enabled(engine, created.client_id, False)
    fetched = await get_client(engine, created.client_id)
    assert fetched is not None and fetched.enabled is False
    assert await set_enabled(engine, created.client_id, True)
    fetched = await get_client(engine, created.client_id)
    assert fetched is not None and fetched.enabled is True
    assert not await set_enabled(engine, "nobody", False)


@pytest.mark.parametrize(
    "overrides",
    [
        {"organization": "township-1"},
        {"organization": "Patient/1"},
        {"scope": "system/Patient.rs junk"},
        {"scope": "openid"},
        {"client_id": "has space"},
        {"client_secret": "short"},
        {"jwks": {"not": "a set"}},
        {"jwks": {"keys": [{"kty": "EC", "d": "private!"}]}},
    ],
)
async def test_invalid_registrations(engine: AsyncEngine, overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        await _register(engine, **overrides)


async def test_remember_jti_refuses_replays(engine: AsyncEngine) -> None:
    expires = datetime.now(UTC) + timedelta(minutes=5)
    assert await remember_jti(engine, "jti-1", expires)
    assert not await remember_jti(engine, "jti-1", expires)
    assert await remember_jti(engine, "jti-2", expires)


async def test_expired_jtis_are_purged(engine: AsyncEngine) -> None:
    past = datetime.now(UTC) - timedelta(minutes=1)
    assert await remember_jti(engine, "old", past)
    assert await remember_jti(engine, "new", datetime.now(UTC) + timedelta(minutes=5))
    async with engine.connect() as conn:
        left = set((await conn.execute(select(gateway_token_jti.c.jti))).scalars())
    assert left == {"new"}  # the insert of "new" swept "old"
    async with engine.begin() as conn:
        await conn.execute(insert(gateway_token_jti).values(jti="older", expires_at=past))
    assert await purge_expired_jtis(engine) == 1

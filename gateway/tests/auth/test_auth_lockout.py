"""Failed client authentications at /auth/token lead to temporary lockouts, counted in the database."""

import base64
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from gateway.auth import AuthSettings, LockoutPolicy, build_auth_router, create_client

TOKEN_URL = "http://testserver/auth/token"
FORM = {"grant_type": "client_credentials", "scope": "system/Patient.rs"}
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _policy(clock: Clock, **limits: int) -> LockoutPolicy:
    values = {"window_seconds": 60, "max_failures_per_client": 3, "max_failures_per_address": 0,
              "lockout_seconds": 120} | limits
    return LockoutPolicy(clock=clock, **values)


Caller = Callable[..., Any]


@pytest.fixture
async def token_endpoint(engine: AsyncEngine) -> AsyncIterator[Caller]:
    """`post(policy, client_id, secret, address=..., engine=...)` against a token router."""
    await create_client(engine, organization="Organization/county", scope="system/Patient.rs", name="County HIS",
                        level="county", client_id="county-his", client_secret="county-secret")
    opened: list[httpx.AsyncClient] = []

    async def post(policy: LockoutPolicy, client_id: str, secret: str, *, address: str = "10.0.0.1",
                   on: AsyncEngine | None = None, **form: str) -> httpx.Response:
        settings = AuthSettings(base_url="http://testserver/fhir", signing_key=b"g" * 32, lockout=policy)
        app = FastAPI()
        app.include_router(build_auth_router(get_engine=lambda request: on or engine, settings=settings))
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app, client=(address, 4711)),
                                 base_url="http://testserver")
        opened.append(http)
        auth = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        headers = {"Authorization": f"Basic {auth}"} if client_id else {}
        return await http.post("/auth/token", data=FORM | form, headers=headers)

    yield post
    for http in opened:
        await http.aclose()


async def _fail(post: Caller, policy: LockoutPolicy, times: int, client_id: str = "county-his", **kw: Any) -> None:
    for _ in range(times):
        response = await post(policy, client_id, "wrong-secret", **kw)
        assert response.status_code == 401, response.text


async def test_failures_lock_the_client_out_even_for_the_right_secret(token_endpoint: Caller, clock: Clock) -> None:
    policy = _policy(clock)
    await _fail(token_endpoint, policy, 3)
    locked = await token_endpoint(policy, "county-his", "county-secret")
    assert locked.status_code == 429
    assert locked.json()["error"] == "temporarily_unavailable"
    assert locked.headers["retry-after"] == "120"
    assert locked.headers["cache-control"] == "no-store"
    clock.now += 100
    still = await token_endpoint(policy, "county-his", "county-secret")
    assert still.status_code == 429 and still.headers["retry-after"] == "20"
    clock.now += 21
    assert (await token_endpoint(policy, "county-his", "county-secret")).status_code == 200


async def test_other_clients_are_not_locked_by_one_clients_failures(token_endpoint: Caller, engine: AsyncEngine,
                                                                    clock: Clock) -> None:
    await create_client(engine, organization="Organization/thc", scope="system/Patient.rs", name="THC",
                        level="township", client_id="thc-his", client_secret="thc-secret")
    policy = _policy(clock)
    await _fail(token_endpoint, policy, 3)
    assert (await token_endpoint(policy, "thc-his", "thc-secret")).status_code == 200


async def test_an_unknown_client_id_is_counted_like_a_known_one(token_endpoint: Caller, clock: Clock) -> None:
    policy = _policy(clock)
    await _fail(token_endpoint, policy, 3, client_id="nobody")
    assert (await token_endpoint(policy, "nobody", "wrong-secret")).status_code == 429


async def test_failures_from_one_address_lock_that_address(token_endpoint: Caller, clock: Clock) -> None:
    policy = _policy(clock, max_failures_per_client=0, max_failures_per_address=4)
    for n in range(4):
        await _fail(token_endpoint, policy, 1, client_id=f"guess-{n}", address="203.0.113.9")
    locked = await token_endpoint(policy, "county-his", "county-secret", address="203.0.113.9")
    assert locked.status_code == 429
    assert (await token_endpoint(policy, "county-his", "county-secret", address="10.0.0.2")).status_code == 200


async def test_failures_during_a_lockout_do_not_stretch_it(token_endpoint: Caller, clock: Clock) -> None:
    policy = _policy(clock, max_failures_per_client=0, max_failures_per_address=2)
    await _fail(token_endpoint, policy, 2)
    assert (await token_endpoint(policy, "county-his", "county-secret")).status_code == 429
    clock.now += 60
    for _ in range(4):  # a malformed assertion fails before the lockout is looked at
        response = await token_endpoint(policy, "", "", client_assertion_type=ASSERTION_TYPE,
                                        client_assertion="not-a-jwt")
        assert response.status_code == 401
    clock.now += 61
    assert (await token_endpoint(policy, "county-his", "county-secret")).status_code == 200


async def test_a_success_clears_the_count_but_not_an_active_lockout(token_endpoint: Caller, clock: Clock) -> None:
    policy = _policy(clock)
    await _fail(token_endpoint, policy, 2)
    assert (await token_endpoint(policy, "county-his", "county-secret")).status_code == 200
    await _fail(token_endpoint, policy, 2)  # 2 + 2 failures, but the success in between started over
    assert (await token_endpoint(policy, "county-his", "county-secret")).status_code == 200
    await _fail(token_endpoint, policy, 3)
    for _ in range(3):  # retrying with the right secret while locked changes nothing
        assert (await token_endpoint(policy, "county-his", "county-secret")).status_code == 429
    clock.now += 119
    assert (await token_endpoint(policy, "county-his", "county-secret")).status_code == 429


async def test_failures_outside_the_window_do_not_add_up(token_endpoint: Caller, clock: Clock) -> None:
    policy = _policy(clock)
    await _fail(token_endpoint, policy, 2)
    clock.now += 61
    await _fail(token_endpoint, policy, 2)
    assert (await token_endpoint(policy, "county-his", "county-secret")).status_code == 200


async def test_other_refusals_are_not_counted(token_endpoint: Caller, clock: Clock) -> None:
    policy = _policy(clock)
    for _ in range(4):  # authenticated, but asking for a scope it does not hold: not a failed authentication
        response = await token_endpoint(policy, "county-his", "county-secret", scope="system/Task.cruds")
        assert response.status_code == 400
    assert (await token_endpoint(policy, "county-his", "county-secret")).status_code == 200


async def test_failed_assertions_count_too(token_endpoint: Caller, engine: AsyncEngine, clock: Clock,
                                           rs384_key: Any, make_assertion: Any) -> None:
    await create_client(engine, organization="Organization/lab", scope="system/Patient.rs", name="LIS",
                        level="center", client_id="lab-lis", jwks={"keys": [rs384_key.public_jwk]})
    policy = _policy(clock)
    for _ in range(3):
        wrong_aud = make_assertion(rs384_key, "lab-lis", "https://elsewhere/token")
        response = await token_endpoint(policy, "", "", client_assertion_type=ASSERTION_TYPE,
                                        client_assertion=wrong_aud)
        assert response.status_code == 401
    good = make_assertion(rs384_key, "lab-lis", TOKEN_URL)
    response = await token_endpoint(policy, "", "", client_assertion_type=ASSERTION_TYPE, client_assertion=good)
    assert response.status_code == 429


async def test_the_count_is_shared_by_every_process_on_the_database(token_endpoint: Caller, engine: AsyncEngine,
                                                                    clock: Clock) -> None:
    # A second engine on the same database stands for another gateway worker or replica.
    other = create_async_engine(engine.url.render_as_string(hide_password=False))
    try:
        policy = _policy(clock)
        await _fail(token_endpoint, policy, 1)
        await _fail(token_endpoint, policy, 1, on=other)
        await _fail(token_endpoint, policy, 1)
        assert (await token_endpoint(policy, "county-his", "county-secret", on=other)).status_code == 429
    finally:
        await other.dispose()


async def test_limits_of_zero_switch_lockouts_off(token_endpoint: Caller, clock: Clock) -> None:
    policy = _policy(clock, max_failures_per_client=0, max_failures_per_address=0)
    await _fail(token_endpoint, policy, 8)
    assert (await token_endpoint(policy, "county-his", "county-secret")).status_code == 200


def test_policy_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        LockoutPolicy(window_seconds=0)
    with pytest.raises(ValueError):
        LockoutPolicy(max_failures_per_client=-1)

"""Helpers shared by the cross-service tests: settings, PostgreSQL databases, an API client."""

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg

from servicekit.settings import SERVICES, AllianceSettings

FHIR_JSON = "application/fhir+json"
TOKEN_REUSE_SECONDS = 120


def system_settings(data_dir: Path, database_urls: dict[str, str] | None = None, **extra: Any) -> AllianceSettings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "public_base_url": "http://127.0.0.1:8080/fhir",
        "log_json": False,
        "internal_secret": "test-internal-secret-0123456789abcdef0123456789",
        "token_signing_key": "test-token-signing-key-0123456789abcdef012345",
        # The suite shares one PostgreSQL (max_connections 100) with the servers some tests start.
        "database_pool_size": 10,
        # One client sends the suite's requests, faster than a HIS would (a fuzz test sends a
        # thousand in seconds): the limiter's own tests set it (test_security, test_rate_limit).
        "rate_limit_per_second": 0,
        **extra,
    }
    for name, url in (database_urls or {}).items():
        values[f"{name.replace('-', '_')}_database_url"] = url
    return AllianceSettings(**values)


@contextmanager
def postgres_databases(base_url: str, prefix: str) -> Iterator[dict[str, str]]:
    """One fresh database per service on the given server; dropped afterwards."""
    admin = base_url.replace("postgresql+psycopg://", "postgresql://").rstrip("/") + "/postgres"
    names = {service: f"{prefix}_{service.replace('-', '_')}" for service in SERVICES}
    with psycopg.connect(admin, autocommit=True) as conn:
        for name in names.values():
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield {service: f"{base_url.rstrip('/')}/{name}" for service, name in names.items()}
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            for name in names.values():
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# The test client may do everything, reading the audit trail included; tests of refusals name
# narrower scopes.
FULL_SCOPE = "system/*.cruds alliance/audit"


class Api:
    """A FHIR client for tests: tokens per organization, JSON in and out."""

    def __init__(self, system: Any, client: httpx.AsyncClient) -> None:
        self.system = system
        self.client = client
        self._tokens: dict[tuple[str, str, str], tuple[float, str]] = {}

    async def token(self, organization: str = "Organization/test-org", scope: str = FULL_SCOPE,
                    level: str = "county") -> str:
        key = (organization, scope, level)
        cached = self._tokens.get(key)
        # Tokens live 5 minutes and a test session is longer: take a fresh one well before expiry.
        if cached is None or time.monotonic() - cached[0] > TOKEN_REUSE_SECONDS:
            from gateway.auth import create_client

            engine = self.system.state.apps["platform"].state.database.engine
            client_id = f"test-{uuid.uuid4().hex[:12]}"
            registered = await create_client(
                engine, organization=organization, scope=scope, name="test", level=level, client_id=client_id
            )
            response = await self.client.post(
                "/auth/token",
                data={"grant_type": "client_credentials", "scope": scope},
                auth=(client_id, registered.client_secret or ""),
            )
            assert response.status_code == 200, response.text
            self._tokens[key] = (time.monotonic(), response.json()["access_token"])
        return self._tokens[key][1]

    async def headers(self, organization: str = "Organization/test-org", scope: str = FULL_SCOPE,
                      level: str = "county", **extra: str) -> dict[str, str]:
        token = await self.token(organization, scope, level)
        return {"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON, **extra}

    async def request(self, method: str, path: str, body: Any = None, *, organization: str = "Organization/test-org",
                      scope: str = FULL_SCOPE, level: str = "county", headers: dict[str, str] | None = None,
                      **kwargs: Any) -> httpx.Response:
        all_headers = await self.headers(organization, scope, level)
        all_headers.update(headers or {})
        if body is not None and not isinstance(body, bytes | str):
            kwargs["json"] = body
        elif body is not None:
            kwargs["content"] = body
        return await self.client.request(method, "/fhir/" + path.lstrip("/"), headers=all_headers, **kwargs)

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        return await self.request("POST", path, body, **kwargs)

    async def put(self, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        return await self.request("PUT", path, body, **kwargs)

    async def patch(self, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        return await self.request("PATCH", path, body, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("DELETE", path, **kwargs)


def outcome_code(response: httpx.Response) -> str:
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    return body["issue"][0]["code"]


async def eventually(probe: Any, expected: int = 200, *, seconds: float = 5.0) -> httpx.Response:
    """The response of `probe()` once it answers `expected`: for what services learn of each
    other through events (grants from a referral), which lands a moment after the write."""
    import asyncio

    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        response = await probe()
        if response.status_code == expected or asyncio.get_running_loop().time() > deadline:
            return response
        await asyncio.sleep(0.02)


FACILITY_LEVEL = "http://county-alliance.org/fhir/CodeSystem/facility-level"


async def create_organization(api: Any, code: str, parent: str | None, name: str | None = None,
                              *, id_prefix: str = "") -> str:
    """A new Organization of facility level `code` under `parent` (a fresh id each time, so tests
    never see each other's alliance); returns its reference."""
    org_id = f"{id_prefix}{code.split('-')[0]}-{uuid.uuid4().hex[:8]}"
    body: dict[str, Any] = {"resourceType": "Organization", "id": org_id, "name": name or code,
                            "type": [{"coding": [{"system": FACILITY_LEVEL, "code": code}]}]}
    if parent:
        body["partOf"] = {"reference": parent}
    response = await api.put(f"Organization/{org_id}", body)
    assert response.status_code == 201, response.text
    return f"Organization/{org_id}"


def local_day(instant: str) -> str:
    """The alliance's calendar day (+08:00, the default ALLIANCE_TIME_ZONE) of an instant: a period
    such as `period=2026-11-24` means that local day, so after 16:00 UTC it is tomorrow's date."""
    from datetime import datetime, timedelta, timezone

    moment = datetime.fromisoformat(instant.replace("Z", "+00:00"))
    return moment.astimezone(timezone(timedelta(hours=8))).date().isoformat()

"""Cross-service tests drive the whole system through the gateway, as a real client would.

By default the embedded system runs on SQLite files in a temporary directory. With
`ALLIANCE_TEST_POSTGRES_URL=postgresql+psycopg://user@host:port` every service gets its own
fresh PostgreSQL database instead (created here, dropped at the end).
"""

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.support import Api, postgres_databases, system_settings

pytest_plugins: list[str] = []

EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "fhir-r4-examples"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("alliance-data")


@pytest.fixture(scope="session")
def database_urls(data_dir: Path) -> Iterator[dict[str, str] | None]:
    base = os.environ.get("ALLIANCE_TEST_POSTGRES_URL")
    if not base:
        yield None
        return
    with postgres_databases(base, f"t{uuid.uuid4().hex[:8]}") as urls:
        yield urls


@pytest_asyncio.fixture(scope="session")
async def system(data_dir: Path, database_urls: dict[str, str] | None) -> AsyncIterator[Any]:
    from gateway.app import create_gateway_app, service_definitions
    from servicekit.migrations import upgrade

    settings = system_settings(data_dir, database_urls)
    for name, definition in service_definitions().items():
        upgrade(settings.database_url(name), definition.all_lineages)
    app = create_gateway_app(settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest_asyncio.fixture(scope="session")
async def client(system: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=system)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080") as http:
        yield http


@pytest_asyncio.fixture(scope="session")
async def api(system: Any, client: httpx.AsyncClient) -> Api:
    return Api(system, client)

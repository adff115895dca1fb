"""A query running past ALLIANCE_QUERY_TIMEOUT_SECONDS is cancelled (PostgreSQL's statement_timeout,
SQLite's progress handler) and answered 422 too-costly, never 500."""

import os
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from fhirkit.api.handlers import install_exception_handlers, safe_path
from servicekit.db import Database

POSTGRES = os.environ.get("ALLIANCE_TEST_POSTGRES_URL")


# A query that runs for seconds on either database.
SLOW = {
    "postgresql": "SELECT pg_sleep(2)",
    "sqlite": "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000000) SELECT count(*) FROM n",
}


def _databases() -> list[str]:
    return ["sqlite"] + (["postgresql"] if POSTGRES else [])


@pytest.mark.parametrize("kind", _databases())
async def test_a_slow_query_is_cancelled_and_answered_too_costly(kind: str, tmp_path: Path) -> None:
    url = f"{POSTGRES}/postgres" if kind == "postgresql" else f"sqlite+aiosqlite:///{tmp_path / 'slow.db'}"
    database = Database(url, statement_timeout_seconds=0.05)
    await database.start()
    app = FastAPI()
    install_exception_handlers(app)

    @app.get("/slow")
    async def slow() -> None:
        async with database.transaction(write=False) as conn:
            await conn.execute(text(SLOW[kind]))

    started = time.monotonic()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            response = await client.get("/slow")
    finally:
        await database.stop()
    assert response.status_code == 422
    assert response.json()["issue"][0]["code"] == "too-costly"
    assert time.monotonic() - started < 1.5  # cut off, not run to its end


async def test_a_query_within_the_limit_is_not_cut_off(tmp_path: Path) -> None:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'ok.db'}", statement_timeout_seconds=5)
    await database.start()
    try:
        async with database.transaction(write=False) as conn:
            counted = await conn.scalar(text(SLOW["sqlite"].replace("100000000", "10000")))
    finally:
        await database.stop()
    assert counted == 10000


def test_logged_paths_carry_no_ids() -> None:
    assert safe_path("/fhir/Patient/pat-0001/_history/2") == "/fhir/Patient/:id/_history/:id"
    assert safe_path("/fhir/Task/tm-1/$accept") == "/fhir/Task/:id/$accept"

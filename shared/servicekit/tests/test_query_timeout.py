"""A query running past ALLIANCE_QUERY_TIMEOUT_SECONDS is cancelled by PostgreSQL and answered
422 too-costly, never 500 (SQLite has no statement timeout)."""

import os

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from fhirkit.api.handlers import install_exception_handlers, safe_path
from servicekit.db import Database

POSTGRES = os.environ.get("ALLIANCE_TEST_POSTGRES_URL")


@pytest.mark.skipif(not POSTGRES, reason="statement timeouts are PostgreSQL's (ALLIANCE_TEST_POSTGRES_URL)")
async def test_a_slow_query_is_cancelled_and_answered_too_costly() -> None:
    database = Database(f"{POSTGRES}/postgres", statement_timeout_seconds=0.05)
    await database.start()
    app = FastAPI()
    install_exception_handlers(app)

    @app.get("/slow")
    async def slow() -> None:
        async with database.transaction(write=False) as conn:
            await conn.execute(text("SELECT pg_sleep(2)"))

    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            response = await client.get("/slow")
    finally:
        await database.stop()
    assert response.status_code == 422
    assert response.json()["issue"][0]["code"] == "too-costly"


def test_logged_paths_carry_no_ids() -> None:
    assert safe_path("/fhir/Patient/pat-0001/_history/2") == "/fhir/Patient/:id/_history/:id"
    assert safe_path("/fhir/Task/tm-1/$accept") == "/fhir/Task/:id/$accept"

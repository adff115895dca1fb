"""A database that refuses connections, or a pool with no connection free in time, is answered
503 `transient` with Retry-After: the client may retry. Never a 500."""

import sqlite3
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from fhirkit.api.handlers import install_exception_handlers
from servicekit.db import Database


async def _get(app: FastAPI, path: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        return await client.get(path)


def _assert_retry_later(response: httpx.Response) -> None:
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["code"] == "transient"
    assert "retry" in outcome["issue"][0]["diagnostics"]


async def test_a_database_refusing_connections_is_503_with_retry_after() -> None:
    database = Database("postgresql+psycopg://nobody@127.0.0.1:1/none")  # nothing listens on port 1
    await database.start()
    app = FastAPI()
    install_exception_handlers(app)

    @app.get("/read")
    async def read() -> None:
        async with database.transaction(write=False) as conn:
            await conn.execute(text("SELECT 1"))

    try:
        response = await _get(app, "/read")
    finally:
        await database.stop()
    _assert_retry_later(response)


def _sqlite_busy() -> OperationalError:
    busy = sqlite3.OperationalError("database is locked")
    busy.sqlite_errorcode = sqlite3.SQLITE_BUSY  # type: ignore[attr-defined]  # as sqlite3 sets it
    return OperationalError("BEGIN IMMEDIATE", (), busy)


@pytest.mark.parametrize("error", [
    PoolTimeout("QueuePool limit of size 10 overflow 10 reached, connection timed out, timeout 30.00"),
    _sqlite_busy(),
], ids=["pool-exhausted", "sqlite-write-lock"])
async def test_no_connection_in_time_is_503(error: Exception) -> None:
    app = FastAPI()
    install_exception_handlers(app)

    @app.get("/read")
    async def read() -> None:
        raise error

    _assert_retry_later(await _get(app, "/read"))


async def test_other_database_errors_stay_500_without_detail(tmp_path: Path) -> None:
    """A bug (here: a missing table) is not disguised as 'retry later'."""
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    await database.start()
    app = FastAPI()
    install_exception_handlers(app)

    @app.get("/read")
    async def read() -> None:
        async with database.transaction(write=False) as conn:
            await conn.execute(text("SELECT * FROM no_such_table"))

    try:
        response = await _get(app, "/read")
    finally:
        await database.stop()
    assert response.status_code == 500
    assert "no_such_table" not in response.text

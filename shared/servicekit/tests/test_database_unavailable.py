"""A database that refuses connections, or a pool with no connection free in time, is answered
503 `transient` with Retry-After: the client may retry. Never a 500."""

import asyncio
import os
import sqlite3
from pathlib import Path

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from fhirkit.api.handlers import install_exception_handlers
from fhirkit.store import driver
from servicekit.db import Database

POSTGRES = os.environ.get("ALLIANCE_TEST_POSTGRES_URL")


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


def _app_running(database: Database, statement: str) -> FastAPI:
    """An app whose GET /read runs `statement` in a read transaction, with our error handlers."""
    app = FastAPI()
    install_exception_handlers(app)

    @app.get("/read")
    async def read() -> None:
        async with database.transaction(write=False) as conn:
            await conn.execute(text(statement))

    return app


async def test_a_database_refusing_connections_is_503_with_retry_after() -> None:
    database = Database("postgresql+psycopg://nobody@127.0.0.1:1/none")  # nothing listens on port 1
    await database.start()
    try:
        response = await _get(_app_running(database, "SELECT 1"), "/read")
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
    try:
        response = await _get(_app_running(database, "SELECT * FROM no_such_table"), "/read")
    finally:
        await database.stop()
    assert response.status_code == 500
    assert "no_such_table" not in response.text


@pytest.mark.skipif(not POSTGRES, reason="needs ALLIANCE_TEST_POSTGRES_URL")
async def test_connections_lost_to_a_restart_cost_one_503_then_the_pool_is_fresh() -> None:
    """The pool does not ping before each checkout: a connection PostgreSQL dropped fails the
    request that drew it (503, retry), and the pool replaces all of them, so the retry works."""
    database = Database(f"{POSTGRES}/postgres", pool_size=3)
    await database.start()
    app = FastAPI()
    install_exception_handlers(app)

    @app.get("/read")
    async def read() -> dict[str, int]:
        async with database.transaction(write=False) as conn:
            await conn.execute(text("SELECT pg_sleep(0.2)"))  # overlapping: three pooled connections
            return {"backend": int(await conn.scalar(text("SELECT pg_backend_pid()")))}

    try:
        answers = await asyncio.gather(*(_get(app, "/read") for _ in range(3)))
        before = {answer.json()["backend"] for answer in answers}
        assert len(before) == 3
        admin = POSTGRES.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            for pid in before:  # what a restart does to the pooled connections
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        first = await _get(app, "/read")
        _assert_retry_later(first)
        for _ in range(3):  # none of the other two dropped connections is handed out again
            after = await _get(app, "/read")
            assert after.status_code == 200
            assert after.json()["backend"] not in before
    finally:
        await database.stop()


@pytest.mark.skipif(not POSTGRES, reason="needs ALLIANCE_TEST_POSTGRES_URL")
async def test_a_lone_statement_runs_outside_a_transaction_and_leaves_the_pool_transactional() -> None:
    """`Database.statement()` (a read by id) sends no BEGIN: each statement is its own
    transaction. The connection goes back to the pool as it came: the next request's
    transaction is one again."""
    database = Database(f"{POSTGRES}/postgres", pool_size=1)
    await database.start()
    current = text("SELECT pg_current_xact_id()::text")
    try:
        async with database.statement() as conn:
            first, second = await conn.scalar(current), await conn.scalar(current)
        assert first != second
        async with database.transaction(write=False) as conn:
            first, second = await conn.scalar(current), await conn.scalar(current)
        assert first == second
    finally:
        await database.stop()


@pytest.mark.skipif(not POSTGRES, reason="needs ALLIANCE_TEST_POSTGRES_URL")
async def test_a_lone_statement_on_a_dropped_connection_fails_once_and_the_connection_is_not_reused() -> None:
    """The read by id runs on the driver connection in its autocommit mode: when PostgreSQL has
    dropped that connection, the statement fails and the connection never goes back to the pool."""
    database = Database(f"{POSTGRES}/postgres", pool_size=1)
    await database.start()
    backend = text("SELECT pg_backend_pid()")
    try:
        async with database.statement() as conn:
            pid = (await driver.execute(conn, backend, {}))[0][0]
        admin = POSTGRES.replace("postgresql+psycopg://", "postgresql://") + "/postgres"
        with psycopg.connect(admin, autocommit=True) as admin_conn:
            admin_conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(DBAPIError):
            async with database.statement() as conn:
                await driver.execute(conn, backend, {})
        async with database.statement() as conn:
            assert (await driver.execute(conn, backend, {}))[0][0] != pid
        async with database.transaction(write=False) as conn:  # and transactions work on it as before
            assert await conn.scalar(text("SELECT pg_current_xact_id() = pg_current_xact_id()")) is True
    finally:
        await database.stop()


@pytest.mark.skipif(not POSTGRES, reason="needs ALLIANCE_TEST_POSTGRES_URL")
async def test_requests_past_the_pool_size_wait_for_a_pooled_connection_and_open_no_more() -> None:
    """No burst connections: a fifth request on a pool of two waits for one of the two. A burst
    connection is closed as it comes back, so under a steady load above the pool size each
    request would pay for a new PostgreSQL backend."""
    database = Database(f"{POSTGRES}/postgres", pool_size=2)
    await database.start()
    backend = text("SELECT pg_backend_pid() FROM pg_sleep(0.05)")

    async def one() -> int:
        async with database.transaction(write=False) as conn:
            return int(await conn.scalar(backend))

    try:
        first = set(await asyncio.gather(*(one() for _ in range(5))))
        again = set(await asyncio.gather(*(one() for _ in range(5))))
        assert len(first) <= 2
        assert again == first  # the same backends, kept: none was closed and opened anew
    finally:
        await database.stop()

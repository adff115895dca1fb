"""What a PostgreSQL connection is like when the pool hands it out again."""

import os

import pytest
from psycopg.pq import TransactionStatus
from sqlalchemy import text

from fhirkit.store.driver import driver_connection
from servicekit.db import Database

POSTGRES = os.environ.get("ALLIANCE_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(not POSTGRES, reason="needs ALLIANCE_TEST_POSTGRES_URL")


async def _probe_exists(raw) -> bool:
    cursor = await raw.execute("SELECT to_regclass('pg_temp.pool_probe')")
    return (await cursor.fetchone())[0] is not None


@pytest.fixture
async def database():
    database = Database(f"{POSTGRES}/postgres", pool_size=1)  # one connection: every checkout is the same
    await database.start()
    yield database
    await database.stop()


async def test_work_left_in_a_transaction_is_rolled_back_before_the_next_checkout(database) -> None:
    async with database.engine.connect() as conn:
        raw = driver_connection(conn)
        await raw.execute("CREATE TEMP TABLE pool_probe (n int)")  # psycopg opens a transaction
        assert raw.info.transaction_status == TransactionStatus.INTRANS
    async with database.statement() as conn:
        assert driver_connection(conn) is raw
        assert raw.info.transaction_status == TransactionStatus.IDLE
        assert not await _probe_exists(raw)


async def test_a_failed_transaction_is_rolled_back_before_the_next_checkout(database) -> None:
    async with database.engine.connect() as conn:
        raw = driver_connection(conn)
        with pytest.raises(Exception, match="division by zero"):
            await raw.execute("SELECT 1 / 0")
        assert raw.info.transaction_status == TransactionStatus.INERROR
    async with database.statement() as conn:
        assert (await conn.execute(text("SELECT 2"))).scalar() == 2


async def test_statements_and_transactions_hand_back_an_idle_connection(database) -> None:
    async with database.statement() as conn:
        raw = driver_connection(conn)
        assert raw.autocommit
        await raw.execute("CREATE TEMP TABLE pool_probe (n int)")  # autocommit: kept
    assert not raw.autocommit and raw.info.transaction_status == TransactionStatus.IDLE
    async with database.transaction(write=True) as conn:
        await conn.execute(text("INSERT INTO pool_probe VALUES (1)"))
    async with database.reads_then_writes() as conn:
        async with database.writing(conn):
            await conn.execute(text("INSERT INTO pool_probe VALUES (2)"))
        assert (await conn.execute(text("SELECT sum(n) FROM pool_probe"))).scalar() == 3
    assert raw.info.transaction_status == TransactionStatus.IDLE

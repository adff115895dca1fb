"""SQLite without a thread per call: a writer waiting for another connection's lock must wait
off the event loop's thread (the holder may need the loop to finish), and give up cleanly."""

import asyncio
import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from servicekit import sqlite_inline
from servicekit.db import Database


async def _started(path: Path) -> Database:
    database = Database(f"sqlite+aiosqlite:///{path}")
    await database.start()
    return database


async def test_a_writer_waits_for_another_connections_lock_without_blocking_the_loop(tmp_path: Path) -> None:
    # Two Database objects on one file: their in-process writer queues are separate, so the
    # second meets SQLite's lock itself, as another process would.
    first, second = await _started(tmp_path / "x.db"), await _started(tmp_path / "x.db")
    try:
        async with first.transaction(write=True) as conn:
            await conn.execute(text("CREATE TABLE t (v INTEGER)"))
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        async def slow_holder() -> None:
            async with first.transaction(write=True) as conn:
                await conn.execute(text("INSERT INTO t VALUES (1)"))
                await asyncio.sleep(0.3)  # holds the write lock and needs the loop to go on

        async def waiter() -> None:
            await asyncio.sleep(0.05)
            async with second.transaction(write=True) as conn:
                await conn.execute(text("INSERT INTO t VALUES (2)"))

        ticking = asyncio.create_task(ticker())
        await asyncio.gather(slow_holder(), waiter())
        ticking.cancel()
        async with second.transaction(write=False) as conn:
            values = (await conn.execute(text("SELECT v FROM t ORDER BY rowid"))).scalars().all()
        assert values == [1, 2]
        assert ticks >= 15  # the loop kept running while the second writer waited
    finally:
        await first.stop()
        await second.stop()


async def test_a_lock_held_too_long_is_database_is_locked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_inline, "BUSY_WAIT_SECONDS", 0.2)
    first, second = await _started(tmp_path / "y.db"), await _started(tmp_path / "y.db")
    try:
        async with first.transaction(write=True) as conn:
            await conn.execute(text("CREATE TABLE t (v INTEGER)"))
            started = time.monotonic()
            with pytest.raises(OperationalError, match="database is locked"):
                async with second.transaction(write=True) as other:
                    await other.execute(text("INSERT INTO t VALUES (2)"))
            assert 0.2 <= time.monotonic() - started < 2
    finally:
        await first.stop()
        await second.stop()

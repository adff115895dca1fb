"""`ReadMostly`: answers of a rarely written table kept across transactions for a few seconds, by
database; the transaction that changes the table reads it afresh, and the others no longer get
what was kept before the change."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from fhirkit.store.read_mostly import ReadMostly


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Table:
    """A stand-in for the table: its current value, and how often it was read."""

    def __init__(self, value: str) -> None:
        self.value = value
        self.reads = 0

    async def load(self) -> str:
        self.reads += 1
        return self.value


@pytest_asyncio.fixture
async def engines(tmp_path: Path) -> AsyncIterator[tuple[AsyncEngine, AsyncEngine]]:
    first = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}")
    second = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}")
    yield first, second
    await first.dispose()
    await second.dispose()


async def _get(engine: AsyncEngine, cache: ReadMostly, table: Table, key: str = "k") -> str:
    async with engine.begin() as conn:
        return str(await cache.get(conn, key, table.load))


async def test_an_answer_is_kept_for_the_seconds_then_read_again(engines: tuple[AsyncEngine, AsyncEngine]) -> None:
    engine, _ = engines
    clock, table = Clock(), Table("v1")
    cache = ReadMostly("t", seconds=5, clock=clock)
    assert await _get(engine, cache, table) == "v1"
    table.value = "v2"  # written by another worker: nothing tells this one
    clock.now += 4.9
    assert await _get(engine, cache, table) == "v1" and table.reads == 1
    clock.now += 0.2
    assert await _get(engine, cache, table) == "v2" and table.reads == 2


async def test_the_changing_transaction_reads_afresh_and_keeps_nothing_until_it_is_over(
        engines: tuple[AsyncEngine, AsyncEngine]) -> None:
    engine, _ = engines
    clock, table = Clock(), Table("v1")
    cache = ReadMostly("t", seconds=5, clock=clock)
    assert await _get(engine, cache, table) == "v1"
    async with engine.begin() as conn:
        assert await cache.get(conn, "k", table.load) == "v1"  # from what was kept
        cache.changed(conn)
        table.value = "v2"
        assert await cache.get(conn, "k", table.load) == "v2"
        assert await cache.get(conn, "k", table.load) == "v2" and table.reads == 2  # memo of the transaction
    assert await _get(engine, cache, table) == "v2" and table.reads == 3  # kept nothing uncommitted


async def test_databases_keep_their_own_answers_and_a_flood_of_keys_starts_over(
        engines: tuple[AsyncEngine, AsyncEngine]) -> None:
    first, second = engines
    cache = ReadMostly("t", limit=3, clock=Clock())
    one, other = Table("first"), Table("second")
    assert await _get(first, cache, one) == "first"
    assert await _get(second, cache, other) == "second"
    assert await _get(first, cache, one) == "first" and one.reads == 1
    for key in ("a", "b", "c"):  # past the limit of three keys of the first database
        await _get(first, cache, one, key)
    assert one.reads == 4
    await _get(first, cache, one)  # dropped with the rest when "c" came
    assert one.reads == 5
    assert await _get(second, cache, other) == "second" and other.reads == 1


async def test_many_keys_at_once_name_only_those_not_kept(engines: tuple[AsyncEngine, AsyncEngine]) -> None:
    engine, _ = engines
    cache = ReadMostly("t", clock=Clock())
    async with engine.begin() as conn:
        assert cache.missing(conn, ["a", "b"]) == {"a", "b"}
        cache.remember(conn, "a", 1)
        cache.remember(conn, "b", None)  # a code in no item is an answer too
    async with engine.begin() as conn:
        assert cache.missing(conn, ["a", "b", "c"]) == {"c"}
        assert await cache.get(conn, "b", Table("never read").load) is None

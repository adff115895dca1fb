"""SQLite for the asyncio engine without a thread hop per call.

SQLAlchemy's async SQLite dialect drives `aiosqlite`, which runs every cursor call on a thread
of its own and waits for the answer: three or four hops per statement, measured here at ~400 µs of
CPU per trivial statement against ~90 µs for the same statement through the synchronous engine.
A write takes a dozen statements, so the hops cost more than the work.

This module offers the small part of aiosqlite's API that the dialect uses, with coroutines
that call `sqlite3` directly on the event loop's thread. SQLite statements here are short
(indexed look-ups, small inserts); the process's writers queue on an asyncio lock before BEGIN
(`servicekit.db`), so a call blocks the loop only for the statement itself. SQLite's own busy
handler would sleep *on the loop's thread* while another connection holds the write lock, and
that holder may be a transaction of this very process waiting for the loop: the connections
have no busy timeout, and a statement refused as busy is retried after an asyncio sleep, for
up to `busy_wait_seconds`. A runaway query is cut off by a progress handler
(`query_timeout_seconds`) instead of holding the loop.
"""

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

# How long a statement waits for another connection's write lock before "database is locked".
BUSY_WAIT_SECONDS = 30.0


class Cursor:
    __slots__ = ("_cursor", "_deadline")

    def __init__(self, cursor: sqlite3.Cursor, deadline: "_Deadline | None") -> None:
        self._cursor = cursor
        self._deadline = deadline

    async def __aenter__(self) -> "Cursor":
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._cursor.close()

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value

    async def execute(self, sql: str, parameters: Sequence[Any] | None = None) -> "Cursor":
        await self._run(self._cursor.execute, sql, () if parameters is None else parameters)
        return self

    async def executemany(self, sql: str, parameters: Iterable[Sequence[Any]]) -> "Cursor":
        await self._run(self._cursor.executemany, sql, parameters)
        return self

    async def _run(self, call: Callable[[str, Any], Any], sql: str, parameters: Any) -> None:
        waited_until = None
        pause = 0.0005
        while True:
            if self._deadline is not None:
                self._deadline.start()
            try:
                call(sql, parameters)
                return
            except sqlite3.OperationalError as error:
                if getattr(error, "sqlite_errorcode", None) != sqlite3.SQLITE_BUSY:
                    raise
                # A busy statement had no effect: wait off the loop's thread, then retry.
                now = time.monotonic()
                waited_until = waited_until or now + BUSY_WAIT_SECONDS
                if now >= waited_until:
                    raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.02)

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cursor.fetchmany(self._cursor.arraysize if size is None else size)

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()


class _OpenCursor:
    """What `Connection.cursor()` returns: entered (`async with`) to give the cursor."""

    __slots__ = ("_connection", "_deadline")

    def __init__(self, connection: sqlite3.Connection, deadline: "_Deadline | None") -> None:
        self._connection = connection
        self._deadline = deadline

    async def __aenter__(self) -> Cursor:
        return Cursor(self._connection.cursor(), self._deadline)

    async def __aexit__(self, *_exc: object) -> None:
        return None


class _ImmediateQueue:
    """Stands in for aiosqlite's request queue, which the dialect uses to set the isolation
    level: the function runs at once and its future is resolved."""

    def put_nowait(self, item: tuple["asyncio.Future[Any]", Callable[[], Any]]) -> None:
        future, function = item
        try:
            future.set_result(function())
        except Exception as error:
            future.set_exception(error)


class Connection:
    def __init__(self, connection: sqlite3.Connection, deadline: "_Deadline | None" = None) -> None:
        self._conn = connection
        self._connection: sqlite3.Connection | None = connection
        self._deadline = deadline
        self._tx = _ImmediateQueue()

    @property
    def isolation_level(self) -> str | None:
        return self._conn.isolation_level

    def cursor(self) -> _OpenCursor:
        return _OpenCursor(self._conn, self._deadline)

    async def run_statement(self, sql: str, parameters: Any, *, many: bool = False) -> list[Any]:
        """One statement outside SQLAlchemy (fhirkit.store.driver), with the same busy retries and
        query limit; returns its rows."""
        cursor = Cursor(self._conn.cursor(), self._deadline)
        try:
            if many:
                await cursor.executemany(sql, parameters)
                return []
            await cursor.execute(sql, parameters)
            return cursor._cursor.fetchall()
        finally:
            cursor._cursor.close()

    async def commit(self) -> None:
        self._conn.commit()

    async def rollback(self) -> None:
        self._conn.rollback()

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._conn.create_function(*args, **kwargs)

    async def close(self) -> None:
        if self._connection is not None:
            self._connection = None
            self._conn.close()

    def stop(self) -> None:
        if self._connection is not None:
            self._connection = None
            self._conn.close()


class _Deadline:
    """Cuts off a statement that runs longer than the limit: SQLite calls `__call__` every
    few thousand virtual-machine steps and aborts the statement when it answers true
    (sqlite3 then raises OperationalError "interrupted")."""

    __slots__ = ("at", "limit")

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.at = float("inf")

    def start(self) -> None:
        self.at = time.monotonic() + self.limit

    def __call__(self) -> bool:
        return time.monotonic() > self.at


def connector(path: str, *, query_timeout_seconds: float = 0) -> Callable[[], Any]:
    """An `async_creator` for `create_async_engine("sqlite+aiosqlite://", ...)`."""

    async def connect() -> Connection:
        connection = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
        deadline = None
        if query_timeout_seconds > 0:
            deadline = _Deadline(query_timeout_seconds)
            connection.set_progress_handler(deadline, 20_000)
        return Connection(connection, deadline)

    return connect

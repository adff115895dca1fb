"""Database engines and the one transaction per request.

SQLite allows one writer at a time; a transaction that reads then writes under the default
deferred BEGIN fails with `database is locked` when another writer got in between. Write
transactions therefore start with `BEGIN IMMEDIATE` (they queue on the busy timeout instead),
and reads use a second engine with a plain deferred BEGIN so they never wait for writers (WAL).
Within one process the writers also queue, first come first served, on an asyncio lock before
they BEGIN: SQLite's busy handler polls with growing sleeps, so under load some writers would
otherwise wait seconds while newcomers slip in ahead of them.
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from sqlalchemy import event, make_url, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.util import await_only

from fhirkit.store.driver import as_dbapi_error, driver_connection
from servicekit import sqlite_inline


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def sync_url(url: str) -> str:
    """The URL Alembic uses: the same database through a synchronous driver."""
    return url.replace("sqlite+aiosqlite", "sqlite").replace("postgresql+asyncpg", "postgresql+psycopg")


def _sqlite_engine(url: str, begin: str, query_timeout_seconds: float) -> AsyncEngine:
    # hide_parameters: errors and logs never show the bound values (patient data, identifiers).
    # The connections call sqlite3 on the loop's thread (servicekit.sqlite_inline: no thread hop).
    path = make_url(url).database or ":memory:"
    engine = create_async_engine(
        url, pool_size=8, max_overflow=8, hide_parameters=True,
        async_creator=sqlite_inline.connector(path, query_timeout_seconds=query_timeout_seconds),
    )

    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # let SQLAlchemy emit BEGIN itself
        cursor = dbapi_connection.cursor()
        # No busy timeout: SQLite would sleep on the event loop's thread; sqlite_inline retries a
        # busy statement after an asyncio sleep instead (switching to WAL needs the lock too).
        cursor.execute("PRAGMA busy_timeout=0")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(conn: Any) -> None:
        # Straight to the driver (with its busy retries): SQLAlchemy's statement path cost more
        # than the BEGIN, and every request begins a transaction.
        try:
            await_only(conn.connection.driver_connection.run_statement(begin, ()))
        except Exception as error:
            raise as_dbapi_error(begin, error) from error

    return engine


LONG_STATEMENT_BYTES = 32 * 1024
LONG_STATEMENT_PARAMETERS = 500


def _keep_long_statements_converted() -> None:
    """psycopg converts a statement's `%(name)s` placeholders in Python and keeps the result (an
    LRU of 128) only for statements under 4 KB and 50 parameters. A search carrying its caller's
    access condition is about 5 KB with 56 parameters, in a few shapes that repeat: converting it
    anew each time was a tenth of a search's CPU. The limits are psycopg's module settings;
    `tests` check that they still take effect."""
    from psycopg import _queries

    _queries.MAX_CACHED_STATEMENT_LENGTH = max(_queries.MAX_CACHED_STATEMENT_LENGTH, LONG_STATEMENT_BYTES)
    _queries.MAX_CACHED_STATEMENT_PARAMS = max(_queries.MAX_CACHED_STATEMENT_PARAMS, LONG_STATEMENT_PARAMETERS)


POOL_TIMEOUT_SECONDS = 30.0  # how long a request waits for a pooled connection before 503


class Database:
    def __init__(self, url: str, *, pool_size: int = 20, statement_timeout_seconds: float = 0) -> None:
        self.url = url
        self.pool_size = pool_size
        # A statement running longer is cancelled (0: no limit): PostgreSQL's statement_timeout,
        # SQLite's progress handler.
        self.statement_timeout_ms = int(statement_timeout_seconds * 1000)
        self._write: AsyncEngine | None = None
        self._read: AsyncEngine | None = None
        self._writers = asyncio.Lock() if is_sqlite(url) else None

    @property
    def dialect(self) -> str:
        return "sqlite" if is_sqlite(self.url) else "postgresql"

    async def start(self) -> None:
        if self._write is not None:
            return
        if is_sqlite(self.url):
            limit = self.statement_timeout_ms / 1000
            self._write = _sqlite_engine(self.url, "BEGIN IMMEDIATE", limit)
            self._read = _sqlite_engine(self.url, "BEGIN", limit)
        else:
            _keep_long_statements_converted()
            options = {"options": f"-c statement_timeout={self.statement_timeout_ms}"} if self.statement_timeout_ms else {}
            # No ping before each checkout: it was a round trip on every request (a tenth of a
            # read). A connection lost meanwhile (PostgreSQL restarted) fails its request with
            # 503 and Retry-After (fhirkit.api.handlers), nothing written; SQLAlchemy then
            # replaces every connection of the pool, so the retry gets a fresh one.
            # No burst connections past the pool (max_overflow 0): SQLAlchemy closes one as it
            # comes back, so under a load above the pool size every request opened a PostgreSQL
            # backend (reads at 32 connections, pool 5: 1,252/s against 2,482/s with 16). A
            # request that finds every connection busy waits for one (pool_timeout, then 503).
            self._write = create_async_engine(
                self.url, pool_size=self.pool_size, max_overflow=0, pool_timeout=POOL_TIMEOUT_SECONDS,
                pool_pre_ping=False,
                hide_parameters=True, connect_args=options,
            )
            self._read = self._write
            await self._warn_without_autovacuum()

    async def _warn_without_autovacuum(self) -> None:
        """Without autovacuum nothing keeps the planner's statistics current, and searches are
        planned as if the tables were empty (docs/operations.md, "PostgreSQL statistics")."""
        try:
            async with self.engine.connect() as conn:
                setting = (await conn.execute(text("SHOW autovacuum"))).scalar()
        except Exception:  # the database may not be up yet: readiness reports that
            return
        if setting != "on":
            logging.getLogger("alliance.db").warning(
                "PostgreSQL autovacuum is %s on %s: run ANALYZE after loads, or turn autovacuum on",
                setting, make_url(self.url).database)

    async def stop(self) -> None:
        for engine in {id(e): e for e in (self._write, self._read) if e is not None}.values():
            await engine.dispose()
        self._write = self._read = None

    @property
    def engine(self) -> AsyncEngine:
        if self._write is None:
            raise RuntimeError("Database.start() has not run (lifespan)")
        return self._write

    @property
    def read_engine(self) -> AsyncEngine:
        """For lookups outside a request's transaction: on SQLite it never waits for the write
        lock (WAL readers do not block), so a busy writer cannot stall authentication."""
        if self._write is None:
            raise RuntimeError("Database.start() has not run (lifespan)")
        return self._read or self._write

    @asynccontextmanager
    async def statement(self) -> AsyncIterator[AsyncConnection]:
        """For a request that only reads (a read by id, a search, a history). On PostgreSQL its
        statements run without BEGIN and COMMIT, each seeing what was committed when it started:
        what READ COMMITTED gives inside a transaction too, without its two round trips (a read
        by id is one statement in all). SQLite: a read transaction as usual (no round trips to
        save)."""
        if is_sqlite(self.url):
            async with self.transaction(write=False) as conn:
                yield conn
            return
        async with self.engine.connect() as conn:
            # The driver's own switch, flipped back before the pool takes the connection again:
            # SQLAlchemy's isolation-level option did the same at twice the cost.
            raw = driver_connection(conn)
            await raw.set_autocommit(True)
            try:
                yield conn
            finally:
                try:
                    await raw.set_autocommit(False)
                except Exception:  # a broken connection: never back into the pool
                    await conn.invalidate()

    def reads_then_writes(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """For a request that reads and writes only when it finds something to record (a repeated
        `$recognition-check` records nothing): on PostgreSQL its reads run as `statement()`'s and
        `writing(conn)` opens the transaction for the writes; on SQLite one write transaction
        throughout (a read transaction cannot take the write lock safely later, and there are no
        round trips to save)."""
        return self.transaction(write=True) if is_sqlite(self.url) else self.statement()

    @asynccontextmanager
    async def writing(self, conn: AsyncConnection) -> AsyncIterator[None]:
        """The writes of a `reads_then_writes()` connection, as one transaction (BEGIN … COMMIT,
        ROLLBACK on an error). Inside a transaction already: nothing more."""
        raw = None if is_sqlite(self.url) else driver_connection(conn)
        if raw is None or not raw.autocommit:
            yield
            return
        async with raw.transaction():
            yield

    @asynccontextmanager
    async def transaction(self, *, write: bool) -> AsyncIterator[AsyncConnection]:
        """The request's one transaction: commit on success, roll back on any error."""
        engine = self.engine if write else (self._read or self.engine)
        if not write or self._writers is None:
            async with engine.begin() as conn:
                yield conn
            return
        try:
            # The same patience as a statement waiting for another process's lock.
            await asyncio.wait_for(self._writers.acquire(), sqlite_inline.BUSY_WAIT_SECONDS)
        except TimeoutError:
            from fhirkit.errors import UpstreamUnavailable

            raise UpstreamUnavailable("The database is busy; retry shortly") from None
        try:
            async with engine.begin() as conn:
                yield conn
        finally:
            self._writers.release()

"""Leader leases in the database: one holder per name at a time, across processes.

SQLite has no advisory locks, and its write lock cannot be held for a dispatcher's whole life
(every other writer would stop). So a row per name says who holds the lease until when. It is
taken and renewed in short write transactions (BEGIN IMMEDIATE makes each one atomic across
processes) and ends when released, when it expires unrenewed, or at once when its holder is a
process of this machine that no longer exists (a crashed worker must not hold up its successor
for a whole term).
"""

import asyncio
import logging
import os
import socket
import uuid
from typing import Any

from sqlalchemy import BigInteger, Column, String, Table, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from servicekit.db import Database
from servicekit.events.envelope import now_micros
from servicekit.events.tables import EVENTS_METADATA
from servicekit.events.tasks import uninterrupted

log = logging.getLogger("alliance.events")

lease = Table(
    "servicekit_lease",
    EVENTS_METADATA,
    Column("name", String(128), primary_key=True),
    Column("holder", String(128), nullable=False),  # host:pid:nonce of the holding process
    Column("expires_at", BigInteger, nullable=False),  # µs since the epoch, wall clock
)

HOST = socket.gethostname()


class LeaseLost(Exception):
    """The lease expired or went to another process while this one thought it held it."""


def new_holder() -> str:
    return f"{HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def holder_is_gone(holder: str) -> bool:
    """True when `holder` was a process of this machine that has ended."""
    parts = holder.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != HOST or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return False  # this process: alive (a holder of ours not released is still ours to end)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's process
    return False


class Lease:
    def __init__(self, database: Database, name: str, ttl_seconds: float) -> None:
        self.database = database
        self.name = name
        self.ttl_micros = int(ttl_seconds * 1_000_000)
        self.holder = new_holder()
        self.expires_at = 0  # of our own term, as last written
        self.lost = False

    async def acquire(self) -> bool:
        """Take the lease if it is free, expired, ours, or its holder has died."""
        # Standbys ask every poll interval: look first without taking SQLite's write lock.
        async with self.database.transaction(write=False) as conn:
            if not self._takeable(await self._current(conn), now_micros()):
                return False
        now = now_micros()
        async with self.database.transaction(write=True) as conn:
            current = await self._current(conn)
            if not self._takeable(current, now):
                return False
            taken = await self._insert(conn, now) if current is None else await self._take(conn, current.holder, now)
        if taken:
            self.expires_at, self.lost = now + self.ttl_micros, False
        return taken

    async def _current(self, conn: AsyncConnection) -> Any:
        return (await conn.execute(select(lease).where(lease.c.name == self.name))).first()

    def _takeable(self, current: Any, now: int) -> bool:
        return (current is None or current.holder == self.holder or current.expires_at < now
                or holder_is_gone(current.holder))

    async def _insert(self, conn: AsyncConnection, now: int) -> bool:
        values = {"name": self.name, "holder": self.holder, "expires_at": now + self.ttl_micros}
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        statement = dialect.insert(lease).values(**values).on_conflict_do_nothing().returning(lease.c.name)
        return (await conn.execute(statement)).first() is not None

    async def _take(self, conn: AsyncConnection, previous: str, now: int) -> bool:
        # Conditional on the holder just read: on PostgreSQL two takers may have read the same row.
        result = await conn.execute(
            update(lease)
            .where(lease.c.name == self.name, lease.c.holder == previous)
            .values(holder=self.holder, expires_at=now + self.ttl_micros)
            .returning(lease.c.name)
        )
        return result.first() is not None

    async def renew(self) -> bool:
        """Extend our term; False when the lease is no longer ours."""
        now = now_micros()
        async with self.database.transaction(write=True) as conn:
            result = await conn.execute(
                update(lease)
                .where(lease.c.name == self.name, lease.c.holder == self.holder)
                .values(expires_at=now + self.ttl_micros)
                .returning(lease.c.name)
            )
            renewed = result.first() is not None
        if renewed:
            self.expires_at = now + self.ttl_micros
        return renewed

    async def release(self) -> None:
        async with self.database.transaction(write=True) as conn:
            await conn.execute(delete(lease).where(lease.c.name == self.name, lease.c.holder == self.holder))

    async def keep(self) -> None:
        """Renew every third of the term until cancelled; mark the lease lost when it went to
        someone else or could not be renewed before it ran out (the database stayed busy)."""
        while True:
            await asyncio.sleep(self.ttl_micros / 3_000_000)
            try:
                # Never cut in the middle of its transaction (servicekit.events.tasks).
                if not await uninterrupted(self.renew()):
                    self.lost = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("lease %s: renewal failed: %s", self.name, exc)
                if now_micros() >= self.expires_at:
                    self.lost = True
            if self.lost:
                log.warning("lease %s: lost", self.name)
                return

    async def check(self) -> None:
        """Raise LeaseLost unless the lease is still ours (as of the last renewal)."""
        if self.lost or now_micros() >= self.expires_at:
            raise LeaseLost(self.name)


__all__ = ["Lease", "LeaseLost", "holder_is_gone", "lease", "new_holder"]

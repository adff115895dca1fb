"""Periodic sweeps inside a service (deadline escalation): one transaction per sweep, acting as
the platform (system identity).

Every worker process runs the loop; a sweep still acts once. A sweep reads the Tasks it may
change inside its own write transaction and changes only what is still due (an escalation level
not yet reached, a Task still open), so what matters is that two sweeps never overlap:

* PostgreSQL: only the holder of a transaction-scoped advisory lock sweeps; a worker that finds
  it taken skips this tick, and the next sweep starts after the lock holder committed.
* SQLite: the write transaction is itself the lock. It begins with BEGIN IMMEDIATE (servicekit.db),
  which takes the database's single write lock across processes before the first read, so a
  second worker's sweep waits and then reads what the first one wrote. The sweeps of N workers
  cost N short transactions per interval, nothing more, so no lease is taken.

A failing sweep is logged and retried at the next tick, never fatal to the service.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI
from sqlalchemy import func, select

from fhirkit.store.repository import Repository
from servicekit.peers import SYSTEM_IDENTITY

Report = TypeVar("Report")


async def sweep_once(
    app: FastAPI, lock: tuple[int, int], sweep: Callable[[Repository, int], Awaitable[Report]]
) -> Report | None:
    """Run `sweep(repo, now)` once in a write transaction; None when another worker holds `lock`."""
    database, store = app.state.database, app.state.service.store
    async with database.transaction(write=True) as conn:
        # SQLite needs nothing more: this transaction already holds the write lock (see above).
        if conn.dialect.name == "postgresql":
            locked = await conn.scalar(select(func.pg_try_advisory_xact_lock(*lock)))
            if not locked:
                return None  # another worker is sweeping
        repo = Repository(conn, store, caller=SYSTEM_IDENTITY)
        return await sweep(repo, store.clock())


async def run_every(
    interval_seconds: Callable[[], float],
    once: Callable[[], Awaitable[Any]],
    log: logging.Logger,
    changed: Callable[[Any], int],
    *,
    service: str,
) -> None:
    """Call `once` every interval until cancelled; `changed(report)` says how many Tasks it moved."""
    while True:
        await asyncio.sleep(interval_seconds())
        try:
            report = await once()
            if report is not None and changed(report):
                log.info("deadline sweep", extra={"service": service, "status": changed(report)})
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("deadline sweep failed")

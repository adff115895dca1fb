"""Periodic sweeps inside a service (deadline escalation): one transaction per sweep, acting as
the platform (system identity).

With several worker processes on PostgreSQL only the holder of a transaction-scoped advisory lock
sweeps, so an escalation or expiry never happens twice; SQLite's embedded mode has one process.
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

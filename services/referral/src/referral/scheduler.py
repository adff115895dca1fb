"""The deadline scheduler: runs the sweep of `referral.deadlines` every few seconds.

With several worker processes on PostgreSQL only the holder of a transaction-scoped advisory lock
sweeps, so an escalation or expiry never happens twice; SQLite's embedded mode has one process.
A failing sweep is logged and retried at the next tick, never fatal to the service.
"""

import asyncio
import logging
import os

from fastapi import FastAPI
from sqlalchemy import func, select

from fhirkit.store.repository import Repository
from referral import deadlines
from servicekit.peers import SYSTEM_IDENTITY

log = logging.getLogger("alliance.referral.scheduler")
SWEEP_LOCK = (3711, 1)  # (class, object) advisory lock keys, apart from the events dispatcher's


def interval_seconds() -> float:
    return float(os.environ.get("ALLIANCE_REFERRAL_SWEEP_SECONDS", "60"))


async def sweep_once(app: FastAPI) -> deadlines.SweepReport | None:
    database, store = app.state.database, app.state.service.store
    async with database.transaction(write=True) as conn:
        if conn.dialect.name == "postgresql":
            locked = await conn.scalar(select(func.pg_try_advisory_xact_lock(*SWEEP_LOCK)))
            if not locked:
                return None  # another worker is sweeping
        repo = Repository(conn, store, caller=SYSTEM_IDENTITY)
        return await deadlines.sweep(repo, store.clock())


async def deadline_scheduler(app: FastAPI) -> None:
    while True:
        await asyncio.sleep(interval_seconds())
        try:
            report = await sweep_once(app)
            if report and (report.escalated or report.expired):
                log.info("deadline sweep", extra={"service": "referral", "status": report.escalated + report.expired})
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("deadline sweep failed")

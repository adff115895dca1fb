"""The deadline scheduler: runs the sweep of `referral.deadlines` every few seconds (the loop and
its locking are `servicekit.scheduler`'s)."""

import logging
import os

from fastapi import FastAPI

from referral import deadlines
from servicekit import scheduler

log = logging.getLogger("alliance.referral.scheduler")
SWEEP_LOCK = (3711, 1)  # (class, object) advisory lock keys, apart from the events dispatcher's


def interval_seconds() -> float:
    return float(os.environ.get("ALLIANCE_REFERRAL_SWEEP_SECONDS", "60"))


async def sweep_once(app: FastAPI) -> deadlines.SweepReport | None:
    return await scheduler.sweep_once(app, SWEEP_LOCK, deadlines.sweep)


async def deadline_scheduler(app: FastAPI) -> None:
    await scheduler.run_every(interval_seconds, lambda: sweep_once(app), log,
                              lambda report: report.escalated + report.expired, service="referral")

"""The telemedicine deadline scheduler: `telemedicine.deadlines.sweep` every
`ALLIANCE_TELEMEDICINE_SWEEP_SECONDS` (60 by default), one worker at a time."""

import logging
import os

from fastapi import FastAPI

from servicekit import scheduler
from telemedicine import deadlines

log = logging.getLogger("alliance.telemedicine.scheduler")
SWEEP_LOCK = (3711, 2)  # referral's sweep holds (3711, 1)


def interval_seconds() -> float:
    return float(os.environ.get("ALLIANCE_TELEMEDICINE_SWEEP_SECONDS", "60"))


async def sweep_once(app: FastAPI) -> deadlines.SweepReport | None:
    return await scheduler.sweep_once(app, SWEEP_LOCK, deadlines.sweep)


async def deadline_scheduler(app: FastAPI) -> None:
    await scheduler.run_every(interval_seconds, lambda: sweep_once(app), log, lambda report: report.escalated,
                              service="telemedicine")


async def check_configuration(app: FastAPI) -> None:
    deadlines.configured()  # raises on a malformed ALLIANCE_TELEMEDICINE_DEADLINES: fail at start-up

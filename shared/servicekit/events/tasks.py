"""Stopping background tasks reliably, without ever cutting a database call in half."""

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger("alliance.events")

T = TypeVar("T")


async def stop_task(task: "asyncio.Task[Any]", grace: float = 2.0) -> None:
    """Cancel `task` and wait until it has ended.

    Python 3.11's `asyncio.wait_for` (used here and inside nats-py) returns the result instead
    of raising when a cancellation arrives just as the awaited future completes, so a single
    `cancel()` can be lost and the task would run on: cancel again after `grace` seconds.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=grace)
    if not task.cancelled() and task.exception() is not None:
        log.debug("task %s had failed: %s", task.get_name(), task.exception())


async def uninterrupted(unit: Coroutine[Any, Any, T]) -> T:
    """Run a database unit of work (one transaction) to its end even if the caller is
    cancelled meanwhile, then let the cancellation through.

    A cancellation that lands inside an aiosqlite or psycopg call abandons the connection
    halfway; with SQLite its write lock can stay held and every later writer fails with
    "database is locked". Stopping a dispatcher or consumer must wait for its commit or
    rollback instead.
    """
    task = asyncio.ensure_future(unit)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError as error:
            cancelled = error
    if cancelled is not None:
        if not task.cancelled() and task.exception() is not None:
            log.debug("unit of work failed while stopping: %s", task.exception())
        raise cancelled
    return task.result()

"""Delivery: one background worker per gateway process, one lease per subscription.

For each subscription, in order: check the pending matches for entitlement and number them; send
the handshake if one is owed; send what the receiver has not taken, oldest first, `max_count` per
bundle; send a heartbeat when one is due. A failure marks the subscription `error` and schedules
the next attempt with exponential backoff; after the retry window it is `off` and says why, and
everything missed stays numbered and available through `$events`.
"""

import asyncio
import logging
from typing import Any

import httpx
import orjson
from fastapi import FastAPI

from fhirkit.errors import FhirError
from fhirkit.store.repository import Repository
from gateway.auth.clients import get_client
from gateway.subscriptions import queue
from gateway.subscriptions.endpoints import delivery_client
from gateway.subscriptions.hub import HUB_WRITE, Hub, forget_hub, now_micros
from gateway.subscriptions.notifications import (
    SIGNATURE_HEADER,
    NotificationEvent,
    StatusView,
    notification_bundle,
    sign,
)
from servicekit.identity import CallerIdentity
from servicekit.peers import SYSTEM_IDENTITY

log = logging.getLogger("alliance.subscriptions")

# A lease is short and renewed while its step runs, so that a worker killed mid-delivery (no
# release) holds up its subscriptions for seconds, not for the length of a whole step.
LEASE_SECONDS = 10
LEASE_RENEW_SECONDS = 3
MAX_BATCHES_PER_STEP = 20  # then let the other subscriptions have a turn
PRUNE_EVERY_SECONDS = 600
MICROS = 1_000_000


async def run_delivery(app: FastAPI) -> None:
    """Platform background job."""
    hub: Hub = app.state.subscription_hub
    hub.gateway = getattr(app.state, "gateway", None)
    try:
        await Deliveries(hub).run()
    finally:
        forget_hub(hub)


class Deliveries:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.settings = hub.settings
        self.client = delivery_client(hub.allow_list)
        self.running: dict[str, asyncio.Task[None]] = {}
        self.pruned_at = 0

    async def run(self) -> None:
        try:
            while True:
                self.hub.wake.clear()
                await self._start_due()
                await self._prune_now_and_then()
                try:
                    await asyncio.wait_for(self.hub.wake.wait(), self.settings.subscription_poll_interval_seconds)
                except TimeoutError:
                    pass
        finally:
            for task in self.running.values():
                task.cancel()
            await asyncio.gather(*self.running.values(), return_exceptions=True)
            await self.client.aclose()

    async def _start_due(self) -> None:
        try:
            async with self.hub.database.transaction(write=False) as conn:
                due = await queue.due(conn, now_micros())
        except Exception:
            log.exception("could not list the subscriptions to serve")
            return
        for subscription_id in due:
            task = self.running.get(subscription_id)
            if task is None or task.done():
                self.running[subscription_id] = asyncio.create_task(self._serve(subscription_id))

    async def _serve(self, subscription_id: str) -> None:
        now = now_micros()
        held = now + LEASE_SECONDS * MICROS
        async with self.hub.database.transaction(write=True) as conn:
            if not await queue.take_lease(conn, subscription_id, now, held):
                return  # another worker (replica) has it
        step = asyncio.create_task(self._step(subscription_id))
        try:
            while not step.done():
                await asyncio.wait({step}, timeout=LEASE_RENEW_SECONDS)
                if step.done():
                    break
                renewed = await self._renew_lease(subscription_id, held)
                if renewed is None:
                    log.warning("Subscription/%s: lease lost mid-step; stopping this step", subscription_id)
                    step.cancel()
                    break
                held = renewed
            await step
        except asyncio.CancelledError:
            if not step.done():  # the worker is stopping
                raise
        except Exception:
            log.exception("delivery for Subscription/%s failed unexpectedly; retrying later", subscription_id)
        finally:
            if not step.done():
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)
            async with self.hub.database.transaction(write=True) as conn:
                await queue.release_lease(conn, subscription_id, held)

    async def _renew_lease(self, subscription_id: str, held: int) -> int | None:
        """The new expiry, or None when the lease is no longer this worker's. A failed renewal
        (database busy) keeps the old expiry: the next round tries again."""
        until = now_micros() + LEASE_SECONDS * MICROS
        try:
            async with self.hub.database.transaction(write=True) as conn:
                return until if await queue.renew_lease(conn, subscription_id, held, until) else None
        except Exception:
            log.exception("could not renew the lease of Subscription/%s", subscription_id)
            return held

    async def _load(self, subscription_id: str) -> queue.SubscriptionState | None:
        async with self.hub.database.transaction(write=False) as conn:
            return await queue.load_state(conn, subscription_id)

    async def _step(self, subscription_id: str) -> None:
        state = await self._load(subscription_id)
        if state is None:
            return
        await self._number_pending(state)
        for _ in range(MAX_BATCHES_PER_STEP):
            state = await self._load(subscription_id)
            if state is None or state.status not in ("requested", "active", "error"):
                return
            if state.next_attempt_at > now_micros():
                return
            if not state.handshake_done:
                if not await self._send(state, "handshake", []):
                    return
                continue
            if state.delivered_through < state.events_since_start:
                if not await self._send_backlog(state):
                    return
                continue
            if state.heartbeat_at is not None and state.heartbeat_at <= now_micros():
                await self._send(state, "heartbeat", [])
            return

    # --- entitlement and numbering ---------------------------------------------------------

    async def _number_pending(self, state: queue.SubscriptionState) -> None:
        while True:
            async with self.hub.database.transaction(write=False) as conn:
                pending = await queue.first_pending(conn, state.subscription_id)
            if pending is None:
                return
            verdict = await self._read_as_subscriber(state, pending)
            if verdict is None:
                return  # the owning service did not answer: keep the order, try again later
            entitled, payload = verdict
            async with self.hub.database.transaction(write=True) as conn:
                if not entitled or await queue.already_numbered(conn, state.subscription_id, pending.event_id):
                    await queue.drop_pending(conn, pending.id)
                    continue
                kept = payload if state.config.content == "full-resource" else None
                await queue.number_event(conn, pending, kept, now_micros())

    async def _read_as_subscriber(self, state: queue.SubscriptionState, pending: Any) -> tuple[bool, bytes | None] | None:
        """Ask the owning service to read the event's version as the subscriber would: only a 200
        entitles (and is the full-resource payload). None: no verdict yet (service unavailable)."""
        client = await get_client(self.hub.database.read_engine, state.client_id)
        if client is None or not client.enabled or client.organization != state.organization:
            return False, None  # a revoked client sees nothing more
        if not client.scopes.permits(pending.resource_type, "r"):
            return False, None
        if self.hub.gateway is None:
            return None
        identity = CallerIdentity(client.client_id, client.organization, client.scopes.strings(), client.level)
        path = f"/fhir/{pending.resource_type}/{pending.resource_id}/_history/{pending.version_id}"
        try:
            upstream = await self.hub.gateway.send(pending.service, "GET", path, identity=identity)
        except FhirError as exc:
            log.warning("entitlement read of %s failed: %s", path, exc.diagnostics)
            return None
        if upstream.status == 200:
            return True, upstream.content
        if upstream.status in (401, 403, 404, 410):
            return False, None
        log.warning("entitlement read of %s answered %d; retrying later", path, upstream.status)
        return None

    # --- sending ---------------------------------------------------------------------------

    async def _send_backlog(self, state: queue.SubscriptionState) -> bool:
        async with self.hub.database.transaction(write=False) as conn:
            events = await queue.events_between(
                conn, state.subscription_id, state.delivered_through + 1, None, state.config.max_count
            )
        if not events:  # pruned after the retention period: nothing left to send
            async with self.hub.database.transaction(write=True) as conn:
                await queue.set_state_unless_changed(conn, state, delivered_through=state.events_since_start)
            return True
        return await self._send(state, "event-notification", events)

    async def _send(self, state: queue.SubscriptionState, kind: str, events: list[NotificationEvent]) -> bool:
        view = StatusView(state.subscription_id, state.config.topic_url,
                          "requested" if kind == "handshake" else "active", state.events_since_start)
        body = orjson.dumps(notification_bundle(view, kind, self.settings.base_url, events, state.config.content))
        headers = {"Content-Type": "application/fhir+json", **dict(state.config.headers)}
        if state.secret:
            headers[SIGNATURE_HEADER] = sign(state.secret, body)
        try:
            response = await self.client.post(
                state.config.endpoint, content=body, headers=headers, timeout=state.config.timeout_seconds
            )
            error = None if 200 <= response.status_code < 300 else f"The endpoint answered HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:500] or type(exc).__name__
        if error is None:
            await self._succeeded(state, events)
            return True
        await self._failed(state, kind, error)
        return False

    async def _succeeded(self, state: queue.SubscriptionState, events: list[NotificationEvent]) -> None:
        now = now_micros()
        heartbeat = state.config.heartbeat_seconds
        values: dict[str, Any] = {
            "status": "active", "handshake_done": True, "attempts": 0, "failing_since": None,
            "next_attempt_at": 0, "last_error": None, "last_sent_at": now,
            "heartbeat_at": now + heartbeat * MICROS if heartbeat else None,
        }
        if events:
            values["delivered_through"] = events[-1].number
        async with self.hub.database.transaction(write=True) as conn:
            if await queue.set_state_unless_changed(conn, state, **values) and state.status != "active":
                await self._show_status(conn, state.subscription_id, "active", None)

    async def _failed(self, state: queue.SubscriptionState, kind: str, error: str) -> None:
        now = now_micros()
        attempts = state.attempts + 1
        failing_since = state.failing_since or now
        delay = min(self.settings.subscription_retry_backoff_seconds * 2 ** (attempts - 1),
                    self.settings.subscription_retry_backoff_max_seconds)
        window = self.settings.subscription_retry_window_hours * 3600 * MICROS
        abandoned = now - failing_since >= window
        status = "off" if abandoned else "error"
        message = f"{kind} to {state.config.endpoint} failed: {error}"
        if abandoned:
            message = (f"Delivery stopped after {self.settings.subscription_retry_window_hours:g} h of failures "
                       f"({message}). Events {state.delivered_through + 1} to {state.events_since_start} were not "
                       "delivered and stay available through $events; set status to 'requested' to resume.")
        log.warning("Subscription/%s: %s (attempt %d)", state.subscription_id, message, attempts)
        async with self.hub.database.transaction(write=True) as conn:
            changed = await queue.set_state_unless_changed(
                conn, state, status=status, abandoned=abandoned, attempts=attempts, failing_since=failing_since,
                next_attempt_at=now + int(delay * MICROS), last_error=message,
            )
            if changed:
                await self._show_status(conn, state.subscription_id, status, message)

    async def _show_status(self, conn: Any, subscription_id: str, status: str, error: str | None) -> None:
        """Write the status (and last error) into the Subscription resource itself, so a plain read
        shows whether notifications are flowing."""
        token = HUB_WRITE.set(True)
        try:
            repo = Repository(conn, self.hub.store, caller=SYSTEM_IDENTITY)
            body = (await repo.read("Subscription", subscription_id)).parsed()
            body["status"] = status
            body.pop("error", None)
            if error:
                body["error"] = error[:1000]
            await repo.update("Subscription", subscription_id, body)
        except FhirError as exc:  # deleted meanwhile: nothing to show it on
            log.info("Subscription/%s status not shown: %s", subscription_id, exc.diagnostics)
        finally:
            HUB_WRITE.reset(token)

    async def _prune_now_and_then(self) -> None:
        now = now_micros()
        if now - self.pruned_at < PRUNE_EVERY_SECONDS * MICROS:
            return
        self.pruned_at = now
        retention = int(self.settings.events_retention_days * 86400 * MICROS)
        try:
            async with self.hub.database.transaction(write=True) as conn:
                await queue.prune(conn, now - retention)
        except Exception:
            log.exception("could not prune old notification events")

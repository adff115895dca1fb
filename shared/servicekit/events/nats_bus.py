"""Distributed mode's bus: NATS JetStream through nats-py.

One stream (file storage, `<prefix>.>`, kept for the retention period) holds every service's
events. A publish waits for the stream's acknowledgement and carries the event id as
`Nats-Msg-Id`, so a re-publish after a lost acknowledgement is dropped by the stream's duplicate
window (and by the consumers' inboxes after that). Each consumer is a durable pull consumer with
explicit acknowledgement: it is acknowledged after the handler's transaction commits, a failure
is negatively acknowledged with the consumer's backoff, and an unacknowledged message (a crash)
comes back after `ack_wait`. The client reconnects forever; while it is away publishes fail, the
outbox rows stay unpublished and the dispatcher retries.
"""

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from servicekit.events.bus import BusUnavailable
from servicekit.events.consumers import Consumer, Outcome
from servicekit.events.envelope import Event, event_from_message, message_headers
from servicekit.events.tasks import stop_task

log = logging.getLogger("alliance.events")

PUBLISH_WINDOW = 256  # publishes awaiting their acknowledgements together
FETCH_WAIT_SECONDS = 1.0  # a pull waits this long for messages before asking again
RETRY_PAUSE_SECONDS = 0.5  # after a broker error, before the next fetch


class NatsBus:
    def __init__(
        self,
        url: str,
        *,
        stream: str = "ALLIANCE_EVENTS",
        subject_prefix: str = "alliance.events",
        max_age_seconds: float = 8 * 86400,
        duplicate_window_seconds: float = 300,
        publish_timeout: float = 5.0,
        ack_wait_seconds: float = 60.0,
        fetch_batch: int = 32,
        client_name: str = "county-alliance",
    ) -> None:
        self.url = url
        self.stream = stream
        self.subject_prefix = subject_prefix.rstrip(".")
        self.max_age_seconds = max_age_seconds
        self.duplicate_window_seconds = duplicate_window_seconds
        self.publish_timeout = publish_timeout
        self.ack_wait_seconds = ack_wait_seconds
        self.fetch_batch = fetch_batch
        self.client_name = client_name
        self._members: set[str] = set()
        self._client: Client | None = None
        self._js: JetStreamContext | None = None
        self._ready = asyncio.Event()  # connected and the stream exists
        self._connecting: asyncio.Task[None] | None = None
        self._stream_ready = False
        self._consumers: dict[str, tuple[str, asyncio.Task[None]]] = {}
        self._closing = False

    # --- lifecycle ---------------------------------------------------------------------------

    def attach(self, member: str) -> None:
        return None  # durable consumers live in the broker: nobody has to wait for anybody

    async def start(self, member: str) -> None:
        self._members.add(member)
        if self._connecting is None:
            # In the background: a service starts (and keeps its outbox) while NATS is down.
            self._connecting = asyncio.create_task(self._connect(), name="nats-connect")

    async def stop(self, member: str) -> None:
        for name, (owner, task) in list(self._consumers.items()):
            if owner == member:
                del self._consumers[name]
                await stop_task(task)
        self._members.discard(member)
        if not self._members:
            await self._close()

    async def _connect(self) -> None:
        try:
            await self._open_connection()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("cannot connect to NATS at %s; events stay in the outboxes", self.url)
            raise

    async def _open_connection(self) -> None:
        client = await nats.connect(
            self.url,
            name=self.client_name,
            allow_reconnect=True,
            max_reconnect_attempts=-1,  # forever: the outbox holds what cannot be published meanwhile
            reconnect_time_wait=0.5,  # type: ignore[arg-type]
            connect_timeout=2,
            error_cb=_log_client_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=_log_reconnected,
        )
        self._client = client
        while True:
            try:
                await self._ensure_stream()
                break
            except Exception as exc:
                log.warning("cannot create stream %s yet: %s", self.stream, exc)
                await asyncio.sleep(RETRY_PAUSE_SECONDS)
        self._ready.set()

    async def _close(self) -> None:
        self._closing = True
        if self._connecting is not None:
            await stop_task(self._connecting)
        if self._client is not None and not self._client.is_closed:
            try:
                await self._client.close()
            except Exception as exc:
                log.debug("closing the NATS connection: %s", exc)
        self._client = None
        self._js = None
        self._connecting = None
        self._ready = asyncio.Event()
        self._stream_ready = False
        self._closing = False

    async def _on_disconnected(self) -> None:
        if not self._closing:
            log.warning("disconnected from NATS; reconnecting")

    # --- the stream --------------------------------------------------------------------------

    def _jetstream(self) -> JetStreamContext:
        # One context per connection: its asynchronous publishes share one reply subscription.
        assert self._client is not None
        if self._js is None:
            self._js = self._client.jetstream(timeout=self.publish_timeout)
        return self._js

    async def _ensure_stream(self) -> None:
        if self._stream_ready:
            return
        js = self._jetstream()
        try:
            await js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            await js.add_stream(
                StreamConfig(
                    name=self.stream,
                    subjects=[f"{self.subject_prefix}.>"],
                    storage=StorageType.FILE,
                    retention=RetentionPolicy.LIMITS,
                    discard=DiscardPolicy.OLD,
                    max_age=self.max_age_seconds,
                    duplicate_window=self.duplicate_window_seconds,
                )
            )
        self._stream_ready = True

    async def _connected(self) -> JetStreamContext:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout=self.publish_timeout)
        except TimeoutError:
            raise BusUnavailable(f"Not connected to NATS at {self.url}") from None
        await self._ensure_stream()
        return self._jetstream()

    def full_subject(self, relative: str) -> str:
        return f"{self.subject_prefix}.{relative}"

    # --- publishing --------------------------------------------------------------------------

    async def publish(self, events: Sequence[Event]) -> None:
        """Publishes in windows of up to PUBLISH_WINDOW events: a window is sent in order, then
        its acknowledgements are awaited together, instead of a round trip per event. Two events
        of one resource are never in flight together (the second opens the next window), so a
        failed publish followed by an acknowledged one can only reorder different resources."""
        accepted = 0
        for window in _windows(events):
            acknowledged, error = await self._publish_window(window)
            accepted += acknowledged
            if error is not None:
                if isinstance(error, nats.js.errors.NoStreamResponseError | nats.js.errors.NotFoundError):
                    self._stream_ready = False  # the stream is gone (a broker with a new store)
                failed = window[acknowledged]
                raise BusUnavailable(f"NATS did not acknowledge event {failed.id}: {type(error).__name__}",
                                     accepted=accepted) from error

    async def _publish_window(self, window: Sequence[Event]) -> tuple[int, BaseException | None]:
        """How many of the window's events the stream acknowledged from its first on, and the
        error that stopped the next one (None: all of them)."""
        acks: list[asyncio.Future[Any]] = []
        error: BaseException | None = None
        try:
            js = await self._connected()
            for event in window:
                acks.append(await js.publish_async(
                    self.full_subject(event.subject), event.payload or b"", stream=self.stream,
                    headers=message_headers(event), wait_stall=self.publish_timeout))
        except (BusUnavailable, nats.errors.Error, OSError, TimeoutError) as exc:
            error = exc
        if acks:
            _, late = await asyncio.wait(acks, timeout=self.publish_timeout)
            for ack in late:
                ack.cancel()  # frees its slot in nats-py's table of pending publishes
        for index, ack in enumerate(acks):
            failure = TimeoutError() if ack.cancelled() else ack.exception()
            if failure is not None:
                return index, failure
        return len(acks), error

    # --- consuming ---------------------------------------------------------------------------

    async def subscribe(self, member: str, consumer: Consumer) -> None:
        if consumer.name in self._consumers:
            raise ValueError(f"A consumer named {consumer.name!r} is already subscribed")
        task = asyncio.create_task(self._consume(consumer), name=f"consumer:{consumer.name}")
        self._consumers[consumer.name] = (member, task)

    async def _consume(self, consumer: Consumer) -> None:
        subscription: JetStreamContext.PullSubscription | None = None
        while True:
            try:
                if subscription is None:
                    subscription = await self._pull_subscription(consumer)
                messages = await subscription.fetch(self.fetch_batch, timeout=FETCH_WAIT_SECONDS)
            except (nats.errors.TimeoutError, TimeoutError):
                continue  # nothing new
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("consumer %s: %s; fetching again", consumer.name, exc)
                subscription = await _drop(subscription)
                await asyncio.sleep(RETRY_PAUSE_SECONDS)
                continue
            await self._settle_fetched(consumer, messages)

    async def _pull_subscription(self, consumer: Consumer) -> JetStreamContext.PullSubscription:
        js = await self._connected()
        subject = self.full_subject(consumer.subject_filter)
        config = ConsumerConfig(
            durable_name=consumer.name,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_seconds,
            deliver_policy=DeliverPolicy.ALL,
            # Never let the broker drop a message after N deliveries: the consumer parks it
            # in its dead-letter table instead, where it is visible and can be replayed.
            max_deliver=-1,
            max_ack_pending=1000,
            filter_subject=subject,
        )
        return await js.pull_subscribe(subject, durable=consumer.name, stream=self.stream, config=config)

    async def _settle_fetched(self, consumer: Consumer, messages: list[Msg]) -> None:
        """A fetch's messages in one consumer transaction when they all handle; otherwise one by one."""
        events = [_event_or_none(message) for message in messages]
        if len(messages) > 1 and None not in events and await consumer.process_batch(events):  # type: ignore[arg-type]
            for message in messages:
                await _reply(message.ack())
            return
        for message in messages:
            await self._settle(consumer, message)

    async def _settle(self, consumer: Consumer, message: Msg) -> None:
        try:
            event = event_from_message(message.headers, message.data)
        except (KeyError, ValueError) as exc:
            # Not an envelope of ours (someone published by hand): say so loudly, never retry it.
            log.error(
                "consumer %s: message %s on %s is not an event (%s); terminated",
                consumer.name,
                _stream_sequence(message),
                message.subject,
                exc,
            )
            await _reply(message.term())
            return
        settlement = await consumer.process(event, message.metadata.num_delivered)
        if settlement.outcome is Outcome.RETRY:
            await _reply(message.nak(delay=settlement.delay))
        else:
            # A lost acknowledgement means a redelivery, which the inbox absorbs.
            await _reply(message.ack())


def _event_or_none(message: Msg) -> Event | None:
    try:
        return event_from_message(message.headers, message.data)
    except (KeyError, ValueError):
        return None  # `_settle` terminates it, loudly


async def _reply(reply: Any) -> None:
    try:
        await reply
    except Exception as exc:
        log.debug("acknowledgement not sent: %s", exc)


async def _drop(subscription: JetStreamContext.PullSubscription | None) -> None:
    if subscription is not None:
        try:
            await subscription.unsubscribe()
        except Exception as exc:
            log.debug("unsubscribe: %s", exc)


def _stream_sequence(message: Msg) -> str:
    try:
        return str(message.metadata.sequence.stream)
    except Exception:
        return "?"


async def _log_client_error(error: Exception) -> None:
    log.debug("NATS client: %s", error)


async def _log_reconnected() -> None:
    log.warning("reconnected to NATS")


def _windows(events: Sequence[Event]) -> list[Sequence[Event]]:
    """`events` cut into runs of at most PUBLISH_WINDOW, each holding one event per resource."""
    windows: list[Sequence[Event]] = []
    start = 0
    resources: set[tuple[str | None, str | None]] = set()
    for index, event in enumerate(events):
        resource = (event.resource_type, event.resource_id) if event.resource_id is not None else None
        if index - start >= PUBLISH_WINDOW or (resource is not None and resource in resources):
            windows.append(events[start:index])
            start, resources = index, set()
        if resource is not None:
            resources.add(resource)
    if start < len(events):
        windows.append(events[start:])
    return windows

"""The notification hub of one platform app: its settings, the topics it publishes, the bus
consumers that queue matching events, and the hooks on Subscription and SubscriptionTopic writes.

The platform's `ServiceDefinition` is module-level while settings are per app (the tests run
several systems in one process), so hooks find their hub by the store they write to.
"""

import asyncio
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncConnection

from fhirkit.errors import BusinessRuleViolation, Forbidden, UpstreamUnavailable, VersionConflict
from fhirkit.store.hooks import WriteContext
from fhirkit.store.repository import Repository, StoreConfig
from gateway.auth.scopes import ScopeSet
from gateway.subscriptions import queue
from gateway.subscriptions.criteria import (
    SubscriptionConfig,
    is_query_criteria,
    read_config,
    take_signing_secret,
)
from gateway.subscriptions.endpoints import AllowList, EndpointNotAllowed
from gateway.subscriptions.topics import TOPICS, concerned_topics, event_sources, topic_resource
from servicekit.db import Database
from servicekit.events import Event
from servicekit.peers import SYSTEM_IDENTITY
from servicekit.settings import AllianceSettings

if TYPE_CHECKING:
    from gateway.app import Gateway

# Set while the hub itself writes (topics at start-up, a Subscription's status): the hooks that
# guard subscribers' writes step aside.
HUB_WRITE: ContextVar[bool] = ContextVar("gateway_subscriptions_hub_write", default=False)


def now_micros() -> int:
    return time.time_ns() // 1000


@dataclass
class Hub:
    settings: AllianceSettings
    database: Database
    store: StoreConfig
    allow_list: AllowList
    gateway: "Gateway | None" = None  # set by the gateway app; reads resources as the subscriber
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def for_app(cls, app: FastAPI) -> "Hub":
        settings: AllianceSettings = app.state.settings
        allow_list = AllowList(settings.subscription_endpoint_allow_list,
                               require_https=settings.subscription_require_https)
        return cls(settings, app.state.database, app.state.service.store, allow_list)

    def read_config(self, subscription: dict[str, Any]) -> SubscriptionConfig:
        return read_config(subscription, default_timeout=self.settings.subscription_timeout_seconds,
                           heartbeat_min=self.settings.subscription_heartbeat_min_seconds)


_HUBS: dict[int, Hub] = {}


def hub_for(store: StoreConfig) -> Hub:
    hub = _HUBS.get(id(store))
    if hub is None:
        raise UpstreamUnavailable("The notification hub is not running")
    return hub


def forget_hub(hub: Hub) -> None:
    _HUBS.pop(id(hub.store), None)


async def start_hub(app: FastAPI) -> None:
    """Platform `on_startup`: publish the topics and subscribe the bus consumers."""
    hub = Hub.for_app(app)
    _HUBS[id(hub.store)] = hub
    app.state.subscription_hub = hub
    await publish_topics(hub)
    for service, resource_type in event_sources():
        await app.state.events.subscribe(
            f"gateway-subscriptions-{service}-{resource_type}", f"{service}.{resource_type}.*",
            _queue_matches(hub),
        )


async def publish_topics(hub: Hub) -> None:
    token = HUB_WRITE.set(True)
    try:
        async with hub.database.transaction(write=True) as conn:
            repo = Repository(conn, hub.store, caller=SYSTEM_IDENTITY)
            for topic in TOPICS:
                try:
                    await repo.update("SubscriptionTopic", topic.code, topic_resource(topic))  # unchanged: no-op
                except VersionConflict:
                    pass  # another replica starting at the same moment wrote it
    finally:
        HUB_WRITE.reset(token)


def _queue_matches(hub: Hub) -> Any:
    async def handle(event: Event, conn: AsyncConnection) -> None:
        # Deletes match no topic; the stored bytes are exactly the version that was written.
        if event.kind != "resource" or event.payload is None or event.version_id is None:
            return
        # Who collects for the event's kind is asked before its bytes are parsed: with no
        # subscriber (the usual case) an event costs no parse. The look-up is kept per transaction.
        concerned = concerned_topics(event)
        collecting = await queue.collecting_for(conn, [t.url for t in concerned], event.occurred_at) if concerned else []
        if not collecting:
            return
        resource = event.json()
        matched = {topic.url for topic in concerned if topic.matches(event, resource)}
        for state in collecting:
            if state.config.topic_url in matched and state.config.accepts(resource):
                await queue.enqueue(conn, state.subscription_id, event)
                hub.wake.set()

    return handle


class SubscriptionTopicHooks:
    """Topics are the server's definitions: clients read them, never write them."""

    async def before_write(self, repo: Repository, resource: dict[str, Any] | None, context: WriteContext) -> None:
        if not HUB_WRITE.get():
            raise Forbidden("SubscriptionTopics are defined by the alliance server and cannot be written")

    async def after_write(self, repo: Repository, resource: dict[str, Any] | None, context: WriteContext) -> None:
        return None


class SubscriptionHooks:
    """A subscriber's create/update/delete: check it, keep the secret out of the resource, set the
    server-managed status, and record the delivery state in the same transaction."""

    async def before_write(self, repo: Repository, resource: dict[str, Any] | None, context: WriteContext) -> None:
        if HUB_WRITE.get():
            return
        hub = hub_for(repo.config)
        caller = repo.caller
        state = await queue.load_state(repo.conn, context.resource_id)
        if state is not None and state.organization != caller.organization:
            raise Forbidden(f"Subscription/{context.resource_id} belongs to another organization")
        if resource is None or is_query_criteria(resource):
            # A query-based (R4) subscription is kept unchanged as a record and never delivered;
            # `$status` on it says so. Topic-based delivery stops if it replaces one.
            await queue.forget(repo.conn, context.resource_id)
            return
        secret = take_signing_secret(resource) or (state.secret if state else None)
        config = hub.read_config(resource)
        _require_read_scopes(caller, config)
        try:
            await hub.allow_list.check(config.endpoint)
        except EndpointNotAllowed as exc:
            raise BusinessRuleViolation(str(exc), expression=["Subscription.channel.endpoint"]) from None
        if not secret and not config.headers:
            raise BusinessRuleViolation(
                "Give the receiver a way to authenticate notifications: a signing secret extension or a "
                "channel header (see docs/notifications.md)", expression=["Subscription.channel"])
        status = _status_after_write(resource.get("status"), state, config)
        resource["status"] = status
        resource.pop("error", None)
        if state is not None and status == state.status and state.last_error:
            resource["error"] = state.last_error[:1000]
        await queue.save_subscription(
            repo.conn, context.resource_id, organization=caller.organization, client_id=caller.client_id,
            config=config, secret=secret, status=status, now=now_micros(),
        )

    async def after_write(self, repo: Repository, resource: dict[str, Any] | None, context: WriteContext) -> None:
        if not HUB_WRITE.get():
            hub_for(repo.config).wake.set()


def _status_after_write(asked: Any, state: queue.SubscriptionState | None, config: SubscriptionConfig) -> str:
    """`off` stops; a new subscription, a changed channel or criteria, or `requested` (re)starts
    with a handshake; anything else keeps what the server last set (active, error, off)."""
    if asked == "off":
        return "off"
    if state is None or asked == "requested" or state.config != config:
        return "requested"
    return state.status


def _require_read_scopes(caller: Any, config: SubscriptionConfig) -> None:
    scopes = ScopeSet.parse(" ".join(caller.scopes))
    missing = sorted(t for t in config.topic.resource_types if not scopes.permits(t, "r"))
    if missing:
        raise BusinessRuleViolation(
            f"The client's scopes do not allow reading {', '.join(missing)}, which topic "
            f"{config.topic.code} notifies about", expression=["Subscription.criteria"])

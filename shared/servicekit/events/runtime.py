"""A service's share of the event system: its outbox hooks, its dispatcher and its consumers.

`create_service_app` builds one per service (`app.state.events`) and starts it in the lifespan
after the service's `on_startup` hooks, which is where a service subscribes its consumers.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fhirkit.store.hooks import ResourceHooks
from servicekit.db import Database
from servicekit.events.bus import EventBus
from servicekit.events.consumers import Consumer, Handler, RetryPolicy
from servicekit.events.dispatcher import DispatcherOptions, OutboxDispatcher
from servicekit.events.envelope import check_subject_filter, check_subject_token
from servicekit.events.outbox import with_outbox

if TYPE_CHECKING:
    from servicekit.settings import AllianceSettings


@dataclass(frozen=True)
class EventOptions:
    dispatcher: DispatcherOptions = field(default_factory=DispatcherOptions)
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    @classmethod
    def from_settings(cls, settings: "AllianceSettings") -> "EventOptions":
        return cls(
            dispatcher=DispatcherOptions(
                poll_interval=settings.events_poll_interval_seconds,
                retention_seconds=settings.events_retention_days * 86400,
            ),
            retry=RetryPolicy(
                max_attempts=settings.events_max_attempts,
                backoff=settings.events_retry_backoff_seconds,
                backoff_max=settings.events_retry_backoff_max_seconds,
            ),
        )


class ServiceEvents:
    def __init__(
        self, service: str, database: Database, bus: EventBus, options: EventOptions | None = None
    ) -> None:
        check_subject_token("Service name", service)
        self.service = service
        self.database = database
        self.bus = bus
        self.options = options or EventOptions()
        self.dispatcher = OutboxDispatcher(service, database, bus, self.options.dispatcher)
        self.consumers: dict[str, Consumer] = {}
        self._started = False
        bus.attach(service)

    def store_hooks(
        self, resource_types: Iterable[str], hooks: Mapping[str, ResourceHooks]
    ) -> dict[str, ResourceHooks]:
        """`StoreConfig.hooks`: the service's own hooks around the outbox, for every type."""
        return with_outbox(self.service, resource_types, hooks)

    async def subscribe(self, durable_name: str, subject_filter: str, handler: Handler) -> Consumer:
        """Run `handler(event, conn)` once per event whose subject matches `subject_filter`.

        `subject_filter` is below the bus prefix, with NATS wildcards: `referral.ServiceRequest.*`,
        `referral.business.>`, `*.Observation.create`. `durable_name` names the consumer across
        restarts (letters, digits, `-`, `_`); its position and inbox are kept under that name.
        The handler's writes on `conn` commit together with the inbox row; if it raises, the
        event comes back after a backoff and is parked after `events_max_attempts` deliveries.
        """
        check_subject_token("Consumer name", durable_name)
        check_subject_filter(subject_filter)
        if durable_name in self.consumers:
            raise ValueError(f"{self.service} already has a consumer named {durable_name!r}")
        consumer = Consumer(durable_name, subject_filter, handler, self.database, self.options.retry)
        self.consumers[durable_name] = consumer
        if self._started:
            await self.bus.subscribe(self.service, consumer)
        return consumer

    async def start(self) -> None:
        for consumer in self.consumers.values():
            await self.bus.subscribe(self.service, consumer)
        await self.bus.start(self.service)
        self.dispatcher.start()
        self._started = True

    async def stop(self) -> None:
        self._started = False
        await self.dispatcher.stop()
        await self.bus.stop(self.service)

    async def replay_dead_letters(self, durable_name: str) -> int:
        """Hand a consumer's parked events to its handler again; returns how many succeeded."""
        return await self.consumers[durable_name].replay_parked()

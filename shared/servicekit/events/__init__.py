"""Events between services: the outbox, the bus (in-process or NATS JetStream), the dispatcher
and idempotent consumers. See docs/events.md.

A service appends events in the transaction of its change (`with_outbox` hooks for resource
writes, `emit` for business events); the dispatcher publishes them at least once, in order per
resource; a consumer (`ServiceEvents.subscribe`) handles each event once, in its own database
transaction, deduplicated by event id.
"""

from servicekit.events.bus import BusUnavailable, EventBus, InProcessBus, shared_bus
from servicekit.events.consumers import Consumer, Handler, Outcome, RetryPolicy, Settlement
from servicekit.events.dispatcher import DispatcherOptions, OutboxDispatcher, unpublished_count
from servicekit.events.envelope import Event, subject_matches
from servicekit.events.outbox import OutboxHooks, emit, with_outbox
from servicekit.events.runtime import EventOptions, ServiceEvents
from servicekit.events.tables import EVENTS_LINEAGE, EVENTS_METADATA, dead_letter, inbox, outbox

__all__ = [
    "EVENTS_LINEAGE",
    "EVENTS_METADATA",
    "BusUnavailable",
    "Consumer",
    "DispatcherOptions",
    "Event",
    "EventBus",
    "EventOptions",
    "Handler",
    "InProcessBus",
    "OutboxDispatcher",
    "OutboxHooks",
    "Outcome",
    "RetryPolicy",
    "ServiceEvents",
    "Settlement",
    "dead_letter",
    "emit",
    "inbox",
    "outbox",
    "shared_bus",
    "subject_matches",
    "unpublished_count",
    "with_outbox",
]

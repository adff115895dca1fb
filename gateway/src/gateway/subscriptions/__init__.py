"""Topic-based subscriptions (FHIR R4B, Subscriptions R5 Backport IG) served by the gateway.

See docs/notifications.md. The platform service wires these in: `HOOKS` guard Subscription and
SubscriptionTopic writes, `OPERATIONS` are `$status` and `$events`, `start_hub` publishes the
topics and subscribes the bus consumers, `run_delivery` is the delivery worker.
"""

from gateway.subscriptions.hub import SubscriptionHooks, SubscriptionTopicHooks, start_hub
from gateway.subscriptions.operations import OPERATIONS
from gateway.subscriptions.topics import TOPICS
from gateway.subscriptions.worker import run_delivery

HOOKS = {"Subscription": SubscriptionHooks(), "SubscriptionTopic": SubscriptionTopicHooks()}

__all__ = ["HOOKS", "OPERATIONS", "TOPICS", "run_delivery", "start_hub"]

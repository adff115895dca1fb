"""`Subscription/{id}/$status` and `Subscription/{id}/$events` (Subscriptions Backport IG)."""

import orjson

from fhirkit.api.interactions import Result
from fhirkit.api.router import Operation, OperationCall
from fhirkit.errors import BusinessRuleViolation, InvalidRequest, ResourceNotFound
from gateway.subscriptions import queue
from gateway.subscriptions.criteria import CONTENTS, is_query_criteria
from gateway.subscriptions.notifications import StatusView, notification_bundle, status_bundle

MAX_EVENTS_PER_CALL = 500
IG = "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition"


async def _own_state(call: OperationCall) -> queue.SubscriptionState:
    assert call.resource_id is not None
    await call.repo.read("Subscription", call.resource_id)  # 404 / 410 as for a read
    state = await queue.load_state(call.repo.conn, call.resource_id)
    if state is None and is_query_criteria((await call.repo.read("Subscription", call.resource_id)).parsed()):
        raise BusinessRuleViolation(
            f"Subscription/{call.resource_id} is an R4 query-based subscription, kept as a record only: this "
            "server delivers topic-based subscriptions (docs/notifications.md)")
    # Another organization's subscription is not there for this caller.
    if state is None or state.organization != getattr(call.caller, "organization", None):
        raise ResourceNotFound(f"Subscription/{call.resource_id} is not known")
    return state


def _view(state: queue.SubscriptionState) -> StatusView:
    error = state.last_error
    if error and state.status == "error":
        error += f" Delivered through event {state.delivered_through}; retrying with backoff."
    return StatusView(state.subscription_id, state.config.topic_url, state.status, state.events_since_start, error)


async def subscription_status(call: OperationCall) -> Result:
    state = await _own_state(call)
    return Result(200, orjson.dumps(status_bundle(_view(state), call.options.base)))


async def subscription_events(call: OperationCall) -> Result:
    state = await _own_state(call)
    since = _number(call.parameter("eventsSinceNumber"), "eventsSinceNumber")
    until = _number(call.parameter("eventsUntilNumber"), "eventsUntilNumber")
    content = call.parameter("content") or state.config.content
    if content not in CONTENTS:
        raise InvalidRequest(f"content must be one of {', '.join(CONTENTS)}")
    if content == "full-resource" and state.config.content != "full-resource":
        content = state.config.content  # only what the subscription kept (the IG lets a server ignore the hint)
    first = since or await queue.oldest_retained(call.repo.conn, state.subscription_id) or 1
    events = await queue.events_between(call.repo.conn, state.subscription_id, first, until, MAX_EVENTS_PER_CALL)
    bundle = notification_bundle(_view(state), "query-event", call.options.base, events, content)
    return Result(200, orjson.dumps(bundle))


def _number(value: object, name: str) -> int | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str | int) or not str(value).isdigit() or int(value) < 1:
        raise InvalidRequest(f"{name} is an event number (1 or more)")
    return int(value)


OPERATIONS = [
    Operation(name="status", handler=subscription_status, resource_types=("Subscription",), instance=True,
              methods=("GET", "POST"), writes=False, definition=f"{IG}/backport-subscription-status"),
    Operation(name="events", handler=subscription_events, resource_types=("Subscription",), instance=True,
              methods=("GET", "POST"), writes=False, definition=f"{IG}/backport-subscription-events"),
]

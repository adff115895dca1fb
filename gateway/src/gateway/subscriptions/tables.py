"""The notification hub's tables, in the gateway's database (gateway Alembic lineage).

`gateway_subscription` is each Subscription's delivery state (the resource itself is stored by the
FHIR engine); `gateway_subscription_pending` holds matched events not yet checked for entitlement
(no number yet: an event the subscriber may not see must not leave a gap in its numbering);
`gateway_subscription_event` is the numbered, retained notification stream behind deliveries and
`$events`. Times are microseconds since the Unix epoch (UTC).
"""

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from gateway.auth.clients import METADATA

RowId = BigInteger().with_variant(Integer(), "sqlite")

subscription_state = Table(
    "gateway_subscription",
    METADATA,
    Column("subscription_id", String(64), primary_key=True),
    Column("organization", String(128), nullable=False),
    Column("client_id", String(128), nullable=False),
    Column("topic", String(255), nullable=False),
    Column("config", Text, nullable=False),  # criteria.SubscriptionConfig as JSON
    Column("secret", String(512), nullable=True),  # HMAC key; null: channel headers authenticate
    Column("status", String(16), nullable=False),  # requested | active | error | off
    Column("abandoned", Boolean, nullable=False),  # off because the retry window ran out
    Column("handshake_done", Boolean, nullable=False),
    Column("events_since_start", BigInteger, nullable=False),  # the last event number given
    Column("delivered_through", BigInteger, nullable=False),  # the last number the receiver took
    Column("attempts", Integer, nullable=False),  # failed attempts in a row
    Column("failing_since", BigInteger, nullable=True),
    Column("next_attempt_at", BigInteger, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("last_sent_at", BigInteger, nullable=True),
    Column("heartbeat_at", BigInteger, nullable=True),  # when the next heartbeat is due, if any
    Column("lease_until", BigInteger, nullable=True),  # a worker delivering it now
    Column("created_at", BigInteger, nullable=False),
    Index(None, "topic", "status"),
)

pending_event = Table(
    "gateway_subscription_pending",
    METADATA,
    Column("id", RowId, primary_key=True, autoincrement=True),  # arrival order
    Column("subscription_id", String(64), nullable=False),
    Column("event_id", String(36), nullable=False),
    Column("interaction", String(16), nullable=False),
    Column("resource_type", String(64), nullable=False),
    Column("resource_id", String(64), nullable=False),
    Column("version_id", Integer, nullable=False),
    Column("service", String(64), nullable=False),
    Column("occurred_at", BigInteger, nullable=False),
    UniqueConstraint("subscription_id", "event_id"),
    Index(None, "subscription_id", "id"),
    sqlite_autoincrement=True,
)

notification_event = Table(
    "gateway_subscription_event",
    METADATA,
    Column("subscription_id", String(64), primary_key=True),
    Column("event_number", BigInteger, primary_key=True),
    Column("event_id", String(36), nullable=False),
    Column("interaction", String(16), nullable=False),
    Column("resource_type", String(64), nullable=False),
    Column("resource_id", String(64), nullable=False),
    Column("version_id", Integer, nullable=False),
    Column("occurred_at", BigInteger, nullable=False),
    Column("payload", LargeBinary, nullable=True),  # the resource as the subscriber may read it
    Column("recorded_at", BigInteger, nullable=False),
    UniqueConstraint("subscription_id", "event_id"),
    Index(None, "recorded_at"),
)

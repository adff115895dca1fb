"""The event tables, identical on SQLite and PostgreSQL, and the Alembic lineage that owns them.

`servicekit_outbox` is written in the transaction of the change it announces; the dispatcher
publishes its rows and keeps them for the retention period so that they can be replayed.
`servicekit_inbox` remembers which events a consumer has handled (in the consumer's database,
in the transaction of the handler's effects). `servicekit_dead_letter` holds events a consumer
gave up on, with the whole envelope, so nothing is dropped silently.
Times are microseconds since the Unix epoch (UTC), as in the FHIR store.
"""

from pathlib import Path

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from fhirkit.store.tables import NAMING_CONVENTION
from servicekit.migrations import Lineage

EVENTS_METADATA = MetaData(naming_convention=NAMING_CONVENTION)

EVENTS_LINEAGE = Lineage(
    "servicekit_events", Path(__file__).resolve().parent / "migrations", "servicekit_events_alembic_version"
)

# SQLite only auto-increments an INTEGER PRIMARY KEY.
RowId = BigInteger().with_variant(Integer(), "sqlite")


def _envelope_columns() -> list[Column]:
    """The event's fields, shared by the outbox and the dead-letter table (see envelope.Event)."""
    return [
        Column("event_id", String(36), nullable=False),
        Column("service", String(64), nullable=False),
        Column("kind", String(16), nullable=False),
        Column("event_type", String(128), nullable=False),
        Column("resource_type", String(64), nullable=True),
        Column("resource_id", String(64), nullable=True),
        Column("version_id", Integer, nullable=True),
        Column("owner", String(128), nullable=True),
        Column("occurred_at", BigInteger, nullable=False),
        Column("request_id", String(64), nullable=True),
        Column("payload", LargeBinary, nullable=True),
    ]


outbox = Table(
    "servicekit_outbox",
    EVENTS_METADATA,
    Column("seq", RowId, primary_key=True, autoincrement=True),
    *_envelope_columns(),
    Column("published_at", BigInteger, nullable=True),
    UniqueConstraint("event_id"),
    Index(None, "service", "published_at", "seq"),
    Index(None, "occurred_at"),
    # AUTOINCREMENT: without it SQLite reuses the highest rowid once pruning deleted it, and a
    # sequence number must never come back (replays and subscribers use it as a cursor).
    sqlite_autoincrement=True,
)

inbox = Table(
    "servicekit_inbox",
    EVENTS_METADATA,
    Column("consumer", String(128), primary_key=True),
    Column("event_id", String(36), primary_key=True),
    Column("processed_at", BigInteger, nullable=False),
    Index(None, "processed_at"),
)

dead_letter = Table(
    "servicekit_dead_letter",
    EVENTS_METADATA,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("consumer", String(128), nullable=False),
    Column("seq", BigInteger, nullable=False),
    *_envelope_columns(),
    Column("attempts", Integer, nullable=False),
    Column("error", Text, nullable=False),
    Column("parked_at", BigInteger, nullable=False),
    UniqueConstraint("consumer", "event_id"),
)

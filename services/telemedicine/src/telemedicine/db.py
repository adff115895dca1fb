"""Tables this service owns beyond the FHIR store (its own Alembic lineage).

`telemedicine_slot_booking` is what makes double booking impossible: one row per booked Slot,
the Slot id its primary key, written in the Appointment's own transaction. Two concurrent bookings
of one Slot cannot both insert it, on SQLite (writers are serialised) and on PostgreSQL (the
second insert waits for the first transaction, then fails on the key).
"""

from sqlalchemy import BigInteger, Column, MetaData, String, Table

from fhirkit.store.tables import NAMING_CONVENTION

METADATA = MetaData(naming_convention=NAMING_CONVENTION)

slot_booking = Table(
    "telemedicine_slot_booking",
    METADATA,
    Column("slot_id", String(64), primary_key=True),
    Column("appointment_id", String(64), nullable=False, index=True),
    Column("booked_at", BigInteger, nullable=False),  # µs since the epoch
)

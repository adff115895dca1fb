"""One row per booked Slot: the database refuses a second booking of the same Slot.

Revision ID: telemedicine_0002
Revises: telemedicine_0001
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "telemedicine_0002"
down_revision: str | None = "telemedicine_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "telemedicine_slot_booking",
        sa.Column("slot_id", sa.String(64), nullable=False),
        sa.Column("appointment_id", sa.String(64), nullable=False),
        sa.Column("booked_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("slot_id", name=op.f("pk_telemedicine_slot_booking")),
    )
    op.create_index(op.f("ix_telemedicine_slot_booking_appointment_id"), "telemedicine_slot_booking", ["appointment_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_telemedicine_slot_booking_appointment_id"), table_name="telemedicine_slot_booking")
    op.drop_table("telemedicine_slot_booking")

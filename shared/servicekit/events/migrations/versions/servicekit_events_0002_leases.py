"""leader leases (servicekit_lease): the outbox dispatcher's leadership on SQLite

Revision ID: servicekit_events_0002
Revises: servicekit_events_0001
Create Date: 2026-11-23 11:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "servicekit_events_0002"
down_revision: str | None = "servicekit_events_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "servicekit_lease",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("holder", sa.String(length=128), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_servicekit_lease")),
    )


def downgrade() -> None:
    op.drop_table("servicekit_lease")

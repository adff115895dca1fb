"""subscription delivery state, pending matches and the numbered notification stream

Revision ID: gateway_0002
Revises: gateway_0001
Create Date: 2026-11-23 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "gateway_0002"
down_revision: str | None = "gateway_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "gateway_subscription",
        sa.Column("subscription_id", sa.String(64), nullable=False),
        sa.Column("organization", sa.String(128), nullable=False),
        sa.Column("client_id", sa.String(128), nullable=False),
        sa.Column("topic", sa.String(255), nullable=False),
        sa.Column("config", sa.Text(), nullable=False),
        sa.Column("secret", sa.String(512), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("abandoned", sa.Boolean(), nullable=False),
        sa.Column("handshake_done", sa.Boolean(), nullable=False),
        sa.Column("events_since_start", sa.BigInteger(), nullable=False),
        sa.Column("delivered_through", sa.BigInteger(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("failing_since", sa.BigInteger(), nullable=True),
        sa.Column("next_attempt_at", sa.BigInteger(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_sent_at", sa.BigInteger(), nullable=True),
        sa.Column("heartbeat_at", sa.BigInteger(), nullable=True),
        sa.Column("lease_until", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("subscription_id", name=op.f("pk_gateway_subscription")),
    )
    op.create_index(op.f("ix_gateway_subscription_topic"), "gateway_subscription", ["topic", "status"])
    op.create_table(
        "gateway_subscription_pending",
        sa.Column("id", RowId, autoincrement=True, nullable=False),
        sa.Column("subscription_id", sa.String(64), nullable=False),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("interaction", sa.String(16), nullable=False),
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("resource_id", sa.String(64), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("service", sa.String(64), nullable=False),
        sa.Column("occurred_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_gateway_subscription_pending")),
        sa.UniqueConstraint(
            "subscription_id", "event_id", name=op.f("uq_gateway_subscription_pending_subscription_id")
        ),
        sqlite_autoincrement=True,
    )
    op.create_index(
        op.f("ix_gateway_subscription_pending_subscription_id"), "gateway_subscription_pending",
        ["subscription_id", "id"],
    )
    op.create_table(
        "gateway_subscription_event",
        sa.Column("subscription_id", sa.String(64), nullable=False),
        sa.Column("event_number", sa.BigInteger(), nullable=False),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("interaction", sa.String(16), nullable=False),
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("resource_id", sa.String(64), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("occurred_at", sa.BigInteger(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=True),
        sa.Column("recorded_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("subscription_id", "event_number", name=op.f("pk_gateway_subscription_event")),
        sa.UniqueConstraint(
            "subscription_id", "event_id", name=op.f("uq_gateway_subscription_event_subscription_id")
        ),
    )
    op.create_index(
        op.f("ix_gateway_subscription_event_recorded_at"), "gateway_subscription_event", ["recorded_at"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_gateway_subscription_event_recorded_at"), table_name="gateway_subscription_event")
    op.drop_table("gateway_subscription_event")
    op.drop_index(op.f("ix_gateway_subscription_pending_subscription_id"), table_name="gateway_subscription_pending")
    op.drop_table("gateway_subscription_pending")
    op.drop_index(op.f("ix_gateway_subscription_topic"), table_name="gateway_subscription")
    op.drop_table("gateway_subscription")

"""failed client authentications (lockouts) and the clients' last use

Revision ID: gateway_0004
Revises: gateway_0003
Create Date: 2026-11-24 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "gateway_0004"
down_revision: str | None = "gateway_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "gateway_auth_failure",
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("window_start_ms", sa.BigInteger(), nullable=False),
        sa.Column("locked_until_ms", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_gateway_auth_failure")),
    )
    op.create_index(
        op.f("ix_gateway_auth_failure_window_start_ms"), "gateway_auth_failure", ["window_start_ms"]
    )
    with op.batch_alter_table("gateway_client", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("gateway_client", schema=None) as batch_op:
        batch_op.drop_column("last_used_at")
    op.drop_index(op.f("ix_gateway_auth_failure_window_start_ms"), table_name="gateway_auth_failure")
    op.drop_table("gateway_auth_failure")

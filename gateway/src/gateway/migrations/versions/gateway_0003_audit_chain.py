"""audit hash chain

Revision ID: gateway_0003
Revises: gateway_0002
Create Date: 2026-11-23 07:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "gateway_0003"
down_revision: str | None = "gateway_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "gateway_audit_chain",
        sa.Column("seq", RowId, autoincrement=True, nullable=False),
        sa.Column("audit_id", sa.String(64), nullable=False),
        sa.Column("content_sha256", sa.String(64), nullable=False),
        sa.Column("chain_sha256", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_gateway_audit_chain")),
        sa.UniqueConstraint("audit_id", name=op.f("uq_gateway_audit_chain_audit_id")),
    )


def downgrade() -> None:
    op.drop_table("gateway_audit_chain")

"""sterile supply: the pack links no search parameter indexes (load, delivery, use)

Revision ID: results_sharing_0003_sterile
Revises: results_sharing_0002_recognition
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "results_sharing_0003_sterile"
down_revision: str | None = "results_sharing_0002_recognition"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sterile_trace_link",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("source_type", sa.String(length=64), nullable=False),
        sa.Column("source_id", sa.String(length=64), nullable=False),
        sa.Column("pack_id", sa.String(length=64), nullable=False),
        sa.Column("sterilizer_id", sa.String(length=64), nullable=True),
        sa.Column("organization", sa.String(length=128), nullable=True),
        sa.Column("patient", sa.String(length=128), nullable=True),
        sa.Column("occurred", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sterile_trace_link")),
    )
    op.create_index(op.f("ix_sterile_trace_link_pack_id_kind"), "sterile_trace_link", ["pack_id", "kind"])
    op.create_index(
        op.f("ix_sterile_trace_link_source_type_source_id"), "sterile_trace_link", ["source_type", "source_id"]
    )
    op.create_index(
        op.f("ix_sterile_trace_link_sterilizer_id_occurred"), "sterile_trace_link", ["sterilizer_id", "occurred"]
    )


def downgrade() -> None:
    op.drop_table("sterile_trace_link")

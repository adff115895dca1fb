"""patient merges: which merged-away patient record lives on as which (from the directory's events)

Revision ID: results_sharing_0004_merges
Revises: results_sharing_0003_sterile
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "results_sharing_0004_merges"
down_revision: str | None = "results_sharing_0003_sterile"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "results_patient_merge",
        sa.Column("merged_id", sa.String(length=64), nullable=False),
        sa.Column("survivor_id", sa.String(length=64), nullable=False),
        sa.Column("merged_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("merged_id", name=op.f("pk_results_patient_merge")),
    )
    op.create_index(op.f("ix_results_patient_merge_survivor_id"), "results_patient_merge", ["survivor_id"])


def downgrade() -> None:
    op.drop_table("results_patient_merge")

"""patients' opt-out of sharing

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 07:25:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "fhir_access_opt_out",
        sa.Column("consent_id", sa.String(length=64), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("recorded_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("consent_id", name=op.f("pk_fhir_access_opt_out")),
    )
    with op.batch_alter_table("fhir_access_opt_out", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_fhir_access_opt_out_patient_id"), ["patient_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("fhir_access_opt_out", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_fhir_access_opt_out_patient_id"))
    op.drop_table("fhir_access_opt_out")

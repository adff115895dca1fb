"""access grants

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 06:25:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "fhir_access_grant",
        sa.Column("gid", ROW_ID, autoincrement=True, nullable=False),
        sa.Column("grantee", sa.String(length=128), nullable=False),
        sa.Column("patient_id", sa.String(length=64), nullable=False),
        sa.Column("scope", sa.String(length=32), nullable=False),
        sa.Column("source", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.String(length=255), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("gid", name=op.f("pk_fhir_access_grant")),
    )
    with op.batch_alter_table("fhir_access_grant", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_fhir_access_grant_grantee_patient_id_scope"), ["grantee", "patient_id", "scope"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_fhir_access_grant_source"), ["source"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("fhir_access_grant", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_fhir_access_grant_source"))
        batch_op.drop_index(batch_op.f("ix_fhir_access_grant_grantee_patient_id_scope"))
    op.drop_table("fhir_access_grant")

"""grant targets: a grant may open one resource of the patient instead of all of them

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 06:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("fhir_access_grant", schema=None) as batch_op:
        batch_op.add_column(sa.Column("target_type", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("target_id", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fhir_access_grant", schema=None) as batch_op:
        batch_op.drop_column("target_id")
        batch_op.drop_column("target_type")

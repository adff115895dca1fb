"""Mutual recognition: catalog, quality evaluations, result index, decisions.

Revision ID: results_sharing_0002_recognition
Revises: results_sharing_0001
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "results_sharing_0002_recognition"
down_revision: str | None = "results_sharing_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "recognition_catalog_item",
        sa.Column("code", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("code_system_id", sa.String(64), nullable=False),
        sa.Column("display", sa.String(255), nullable=False),
        sa.Column("category", sa.String(32), nullable=False),
        sa.Column("loinc", sa.String(32), nullable=True),
        sa.Column("validity_days", sa.Integer(), nullable=False),
        sa.Column("validity_days_emergency", sa.Integer(), nullable=True),
        sa.Column("validity_days_inpatient", sa.Integer(), nullable=True),
        sa.Column("scope_required", sa.String(32), nullable=False),
        sa.Column("price", sa.Numeric(12, 2), nullable=False),
        sa.PrimaryKeyConstraint("code", name="pk_recognition_catalog_item"),
    )
    op.create_index("ix_recognition_catalog_item_loinc", "recognition_catalog_item", ["loinc"])

    op.create_table(
        "recognition_quality",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("record_id", sa.String(64), nullable=False),
        sa.Column("organization_id", sa.String(64), nullable=False),
        sa.Column("item_code", sa.String(64), nullable=True),
        sa.Column("category", sa.String(32), nullable=True),
        sa.Column("scope", sa.String(32), nullable=False),
        sa.Column("valid_from", sa.BigInteger(), nullable=False),
        sa.Column("valid_to", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_recognition_quality"),
    )
    op.create_index("ix_recognition_quality_record_id", "recognition_quality", ["record_id"])
    op.create_index("ix_recognition_quality_organization_id_item_code", "recognition_quality",
                    ["organization_id", "item_code"])
    op.create_index("ix_recognition_quality_organization_id_category", "recognition_quality",
                    ["organization_id", "category"])

    op.create_table(
        "recognition_result",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("patient_id", sa.String(64), nullable=False),
        sa.Column("system", sa.String(128), nullable=False),
        sa.Column("code", sa.String(64), nullable=False),
        sa.Column("effective", sa.BigInteger(), nullable=False),
        sa.Column("resource_type", sa.String(32), nullable=False),
        sa.Column("resource_id", sa.String(64), nullable=False),
        sa.Column("producer_id", sa.String(64), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("critical_open", sa.Boolean(), nullable=False),
        sa.Column("diagnostic_conclusion", sa.Boolean(), nullable=False),
        sa.Column("mark_label", sa.String(32), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_recognition_result"),
    )
    op.create_index("ix_recognition_result_patient_id_system_code_effective", "recognition_result",
                    ["patient_id", "system", "code", "effective"])
    op.create_index("ix_recognition_result_resource_type_resource_id", "recognition_result",
                    ["resource_type", "resource_id"])

    op.create_table(
        "recognition_decision",
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("authored", sa.BigInteger(), nullable=False),
        sa.Column("decision", sa.String(32), nullable=False),
        sa.Column("reason", sa.String(8), nullable=True),
        sa.Column("counted", sa.Boolean(), nullable=False),
        sa.Column("item_code", sa.String(64), nullable=True),
        sa.Column("catalog_version", sa.String(64), nullable=True),
        sa.Column("category", sa.String(32), nullable=True),
        sa.Column("producer", sa.String(128), nullable=True),
        sa.Column("requester", sa.String(128), nullable=False),
        sa.Column("price", sa.Numeric(12, 2), nullable=True),
        sa.PrimaryKeyConstraint("task_id", name="pk_recognition_decision"),
    )
    op.create_index("ix_recognition_decision_authored", "recognition_decision", ["authored"])
    op.create_index("ix_recognition_decision_requester", "recognition_decision", ["requester"])


def downgrade() -> None:
    op.drop_table("recognition_decision")
    op.drop_table("recognition_result")
    op.drop_table("recognition_quality")
    op.drop_table("recognition_catalog_item")

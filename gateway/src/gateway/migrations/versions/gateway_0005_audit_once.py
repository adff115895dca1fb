"""AuditEvents are stored once: their copies in the history table go

The platform store keeps AuditEvent append-only (`StoreConfig.append_only`): its resource row is
its one version, and vread, history and `alliance audit verify` read that row. The history rows
written before are copies of those rows; dropping them halves what the audit trail takes on disk.
A downgrade writes them back from the resource rows.

Revision ID: gateway_0005
Revises: gateway_0004
Create Date: 2026-11-24 22:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "gateway_0005"
down_revision: str | None = "gateway_0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = "rid, resource_type, resource_id, version_id, last_updated, deleted, owner, content"


def upgrade() -> None:
    op.execute("DELETE FROM fhir_resource_history WHERE resource_type = 'AuditEvent'")


def downgrade() -> None:
    op.execute(f"INSERT INTO fhir_resource_history ({COLUMNS}, method) SELECT {COLUMNS}, 'POST' "
               "FROM fhir_resource WHERE resource_type = 'AuditEvent' ORDER BY rid")

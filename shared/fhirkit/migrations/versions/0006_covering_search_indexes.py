"""the search by patient and code read from indexes alone

Revision ID: 0006_covering
Revises: 0005_local_dates
Create Date: 2026-11-24 10:40:00

The reference index's value index gains `rid`, and the token index's `rid` index gains the
parameter, code, system and type, so that a search by patient and code needs no heap row of
either table once VACUUM (autovacuum) has marked their pages all-visible. Rebuilds the two
indexes: on a large store, writes to these tables wait meanwhile (about 25 s for 1,000,000
Observations on the bench machine), so upgrade in a maintenance window.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006_covering"
down_revision: str | None = "0005_local_dates"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

REFERENCE_BEFORE = ["resource_type", "param", "target_id", "target_type"]
REFERENCE_AFTER = [*REFERENCE_BEFORE, "rid"]
TOKEN_BEFORE = ["rid"]
TOKEN_AFTER = ["rid", "param", "code", "system", "resource_type"]


def _replace(table: str, before: list[str], after: list[str]) -> None:
    with op.batch_alter_table(table, schema=None) as batch_op:
        batch_op.drop_index(batch_op.f(f"ix_{table}_{'_'.join(before)}"))
        batch_op.create_index(batch_op.f(f"ix_{table}_{'_'.join(after)}"), after, unique=False)


def upgrade() -> None:
    _replace("fhir_reference_index", REFERENCE_BEFORE, REFERENCE_AFTER)
    _replace("fhir_token_index", TOKEN_BEFORE, TOKEN_AFTER)


def downgrade() -> None:
    _replace("fhir_token_index", TOKEN_AFTER, TOKEN_BEFORE)
    _replace("fhir_reference_index", REFERENCE_AFTER, REFERENCE_BEFORE)

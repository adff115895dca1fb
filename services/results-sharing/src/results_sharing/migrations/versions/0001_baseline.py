"""Start of the results-sharing service's own lineage (its domain tables come in later revisions).

Revision ID: results_sharing_0001
Revises:
Create Date: 2026-11-23
"""

from collections.abc import Sequence

revision: str = "results_sharing_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass

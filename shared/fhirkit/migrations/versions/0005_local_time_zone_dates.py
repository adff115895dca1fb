"""dates without a time zone are read in the local time zone

Revision ID: 0005_local_dates
Revises: 0004
Create Date: 2026-11-24 09:00:00

The date index used to read a date, or a dateTime without a zone, as UTC; the engine now reads it
in the deployment's zone (`ALLIANCE_TIME_ZONE`, default +08:00). Rows written before would no
longer match the searches of the same values, so the date index of every current resource that
has one is recomputed here, from the stored JSON, by the engine's own indexing code
(`fhirkit.store.reindex`, which `alliance reindex-dates` runs too). Downgrading
recomputes it as UTC, which is how the code before this revision reads it.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005_local_dates"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    from fhirkit.store.reindex import recompute_date_index
    from servicekit.settings import AllianceSettings

    recompute_date_index(op.get_bind(), AllianceSettings().time_zone)


def downgrade() -> None:
    from fhirkit.store.reindex import recompute_date_index

    recompute_date_index(op.get_bind(), "UTC")

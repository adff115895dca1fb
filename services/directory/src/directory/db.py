"""Tables the directory owns beyond the FHIR store (its own Alembic lineage)."""

from sqlalchemy import Column, MetaData, String, Table

from fhirkit.store.tables import NAMING_CONVENTION

METADATA = MetaData(naming_convention=NAMING_CONVENTION)

# One live Patient per national ID. The unique key makes duplicates impossible even when two
# registrations of the same person race; merged-away records are not in it.
national_id_index = Table(
    "directory_national_id",
    METADATA,
    Column("national_id", String(18), primary_key=True),
    Column("patient_id", String(64), nullable=False, index=True),
)

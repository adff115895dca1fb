"""Tables this service owns beyond the FHIR store (its own Alembic lineage)."""

from sqlalchemy import MetaData

from fhirkit.store.tables import NAMING_CONVENTION

METADATA = MetaData(naming_convention=NAMING_CONVENTION)

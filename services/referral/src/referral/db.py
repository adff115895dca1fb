"""Tables this service owns beyond the FHIR store (its own Alembic lineage)."""

from fhirkit.store.tables import NAMING_CONVENTION
from sqlalchemy import MetaData

METADATA = MetaData(naming_convention=NAMING_CONVENTION)

from fhirkit.store.tables import STORE_METADATA
from servicekit.migrations import run_env

run_env(STORE_METADATA)

from servicekit.events.tables import EVENTS_METADATA
from servicekit.migrations import run_env

run_env(EVENTS_METADATA)

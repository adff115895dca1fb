from servicekit.migrations import run_env
from telemedicine.db import METADATA

run_env(METADATA)

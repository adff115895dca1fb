from results_sharing.db import METADATA
from servicekit.migrations import run_env

run_env(METADATA)

from gateway.auth.clients import METADATA
from servicekit.migrations import run_env

run_env(METADATA)

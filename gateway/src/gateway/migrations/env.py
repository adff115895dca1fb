from gateway import audit_chain  # noqa: F401  (registers its table on METADATA)
from gateway.auth.clients import METADATA
from gateway.subscriptions import tables  # noqa: F401  (registers its tables on METADATA)
from servicekit.migrations import run_env

run_env(METADATA)

"""What the results-sharing service serves: its resource types, hooks, operations and migrations."""

from pathlib import Path

from servicekit import topology
from servicekit.app import ServiceDefinition
from servicekit.migrations import Lineage

LINEAGE = Lineage("results_sharing", Path(__file__).resolve().parent / "migrations", "results_sharing_alembic_version")

DEFINITION = ServiceDefinition(
    name="results-sharing",
    title="Results sharing and mutual recognition (检查检验结果互认)",
    resource_types=topology.RESULTS_SHARING_TYPES,
    lineages=[LINEAGE],
)

"""What the directory service serves: its resource types, hooks, operations and migrations."""

from pathlib import Path

from servicekit import topology
from servicekit.app import ServiceDefinition
from servicekit.migrations import Lineage

LINEAGE = Lineage("directory", Path(__file__).resolve().parent / "migrations", "directory_alembic_version")

DEFINITION = ServiceDefinition(
    name="directory",
    title="Alliance directory: organization tree, practitioners and master patient index",
    resource_types=topology.DIRECTORY_TYPES,
    lineages=[LINEAGE],
)

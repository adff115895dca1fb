"""What the telemedicine service serves: its resource types, hooks, operations and migrations."""

from pathlib import Path

from servicekit import topology
from servicekit.app import ServiceDefinition
from servicekit.migrations import Lineage

LINEAGE = Lineage("telemedicine", Path(__file__).resolve().parent / "migrations", "telemedicine_alembic_version")

DEFINITION = ServiceDefinition(
    name="telemedicine",
    title="Telemedicine (远程医疗)",
    resource_types=topology.TELEMEDICINE_TYPES,
    lineages=[LINEAGE],
)

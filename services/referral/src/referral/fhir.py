"""What the referral service serves: its resource types, hooks, operations and migrations."""

from pathlib import Path

from servicekit import topology
from servicekit.app import ServiceDefinition
from servicekit.migrations import Lineage

LINEAGE = Lineage("referral", Path(__file__).resolve().parent / "migrations", "referral_alembic_version")

DEFINITION = ServiceDefinition(
    name="referral",
    title="Two-way referral (双向转诊)",
    resource_types=topology.REFERRAL_TYPES,
    lineages=[LINEAGE],
)

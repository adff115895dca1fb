"""What the results-sharing service serves: its resource types, hooks, operations and migrations."""

from pathlib import Path

from fhirkit.api.router import Operation
from results_sharing import access, critical, decisions, load, merges, recognition, sterile
from results_sharing.catalog import CatalogHooks
from results_sharing.decisions import DecisionHooks
from results_sharing.quality import QualityHooks
from results_sharing.results import ResultHooks
from servicekit import topology
from servicekit.app import ServiceDefinition
from servicekit.migrations import Lineage

LINEAGE = Lineage("results_sharing", Path(__file__).resolve().parent / "migrations", "results_sharing_alembic_version")
OPERATION_BASE = "http://county-alliance.org/fhir/OperationDefinition"
RECOGNITION_HOOKS = {
    "Observation": ResultHooks(),
    "DiagnosticReport": ResultHooks(),
    "CodeSystem": CatalogHooks(),
    "VerificationResult": QualityHooks(),
    "Task": DecisionHooks(),
}

DEFINITION = ServiceDefinition(
    name="results-sharing",
    title="Results sharing and mutual recognition (检查检验结果互认)",
    resource_types=topology.RESULTS_SHARING_TYPES,
    # Sterile supply wraps the service's other hooks (pass them as the dict argument).
    hooks=sterile.with_sterile_supply(RECOGNITION_HOOKS),
    operations=[
        *sterile.OPERATIONS,
        Operation("recognition-check", recognition.recognition_check, system=True, methods=("GET", "POST"),
                  records_on_get=True, definition=f"{OPERATION_BASE}/recognition-check"),
        Operation("recognition-statistics", decisions.recognition_statistics, system=True, methods=("GET", "POST"),
                  writes=False, definition=f"{OPERATION_BASE}/recognition-statistics"),
        Operation("acknowledge-critical", critical.acknowledge_critical, ("Observation",), instance=True,
                  definition=critical.DEFINITION),
    ],
    on_startup=[sterile.publish_code_systems, load.publish_code_systems, merges.subscribe],
    honours_opt_out=True,
    lineages=[LINEAGE],
    access=access.POLICY,
    task_grants=access.GRANTS,
)

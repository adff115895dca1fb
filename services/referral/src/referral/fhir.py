"""What the referral service serves: referral ServiceRequests and Tasks (two-way referral), the
clinical context around them, and the Provenance of every transition."""

from pathlib import Path

from fhirkit.api.router import Operation
from fhirkit.workflow.operations import transition_operations
from referral import access, onward, scheduler, statistics, tasks
from referral.routing import ReferralRequestHooks
from servicekit import topology
from servicekit.app import ServiceDefinition
from servicekit.migrations import Lineage

LINEAGE = Lineage("referral", Path(__file__).resolve().parent / "migrations", "referral_alembic_version")
OPERATION_BASE = "http://county-alliance.org/fhir/OperationDefinition"

DEFINITION = ServiceDefinition(
    name="referral",
    title="Two-way referral (双向转诊)",
    resource_types=topology.REFERRAL_TYPES,
    hooks={"ServiceRequest": ReferralRequestHooks(), "Task": tasks.ReferralTaskHooks()},
    operations=[
        *transition_operations(tasks.WORKFLOWS),
        Operation("forward", onward.task_forward, ("Task",), instance=True, definition=f"{OPERATION_BASE}/Task-forward"),
        Operation("assign", onward.task_assign, ("Task",), instance=True, definition=f"{OPERATION_BASE}/Task-assign"),
        Operation("referral-statistics", statistics.referral_statistics, system=True, methods=("GET", "POST"),
                  writes=False, definition=f"{OPERATION_BASE}/referral-statistics"),
    ],
    honours_opt_out=True,
    lineages=[LINEAGE],
    access=access.POLICY,
    task_grants=access.GRANTS,
    background=[scheduler.deadline_scheduler],
)

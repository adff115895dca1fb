"""What the telemedicine service serves: teleconsultation and remote-diagnosis invitations
(ServiceRequest + Task on the shared workflow engine), their scheduling (Schedule, Slot,
Appointment), messages (Communication) and the Provenance of every transition (DOMAIN.md §4)."""

from pathlib import Path

from fhirkit.api.router import Operation
from fhirkit.workflow.operations import transition_operations
from servicekit import topology
from servicekit.app import ServiceDefinition
from servicekit.migrations import Lineage
from telemedicine import access, conversion, onward, scheduler, scheduling, statistics, workflow
from telemedicine.invitation import TelemedicineRequestHooks
from telemedicine.tasks import TelemedicineTaskHooks

LINEAGE = Lineage("telemedicine", Path(__file__).resolve().parent / "migrations", "telemedicine_alembic_version")
OPERATION_BASE = "http://county-alliance.org/fhir/OperationDefinition"
IHE_SCHEDULING = "https://profiles.ihe.net/ITI/Scheduling/OperationDefinition"

DEFINITION = ServiceDefinition(
    name="telemedicine",
    title="Telemedicine (远程医疗)",
    resource_types=topology.TELEMEDICINE_TYPES,
    hooks={
        "ServiceRequest": TelemedicineRequestHooks(),
        "Task": TelemedicineTaskHooks(),
        "Appointment": scheduling.AppointmentHooks(),
        "Slot": scheduling.SlotHooks(),
    },
    operations=[
        *transition_operations(workflow.WORKFLOWS),
        Operation("forward", onward.task_forward, ("Task",), instance=True,
                  definition=f"{OPERATION_BASE}/Task-telemedicine-forward"),
        Operation("assign-practitioner", onward.task_assign_practitioner, ("Task",), instance=True,
                  definition=f"{OPERATION_BASE}/Task-assign-practitioner"),
        Operation("convert-to-referral", conversion.task_convert_to_referral, ("Task",), instance=True,
                  definition=f"{OPERATION_BASE}/Task-convert-to-referral"),
        Operation("find", scheduling.appointment_find, ("Appointment",), type_level=True, methods=("GET", "POST"),
                  writes=False, definition=f"{IHE_SCHEDULING}/appointment-find"),
        Operation("book", scheduling.appointment_book, ("Appointment",), type_level=True, takes_resource=True,
                  definition=f"{IHE_SCHEDULING}/appointment-book"),
        Operation("telemedicine-statistics", statistics.telemedicine_statistics, system=True, methods=("GET", "POST"),
                  writes=False, definition=f"{OPERATION_BASE}/telemedicine-statistics"),
        Operation("telemedicine-worklist", statistics.telemedicine_worklist, system=True, methods=("GET", "POST"),
                  writes=False, definition=f"{OPERATION_BASE}/telemedicine-worklist"),
    ],
    honours_opt_out=True,
    lineages=[LINEAGE],
    access=access.POLICY,
    on_startup=[scheduler.check_configuration],
    background=[scheduler.deadline_scheduler],
)

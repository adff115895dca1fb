"""What the directory serves: the organization tree, practitioners and the master patient index."""

from pathlib import Path

from directory import matching
from directory.organizations import OrganizationHooks
from directory.patients import PatientHooks
from fhirkit.access import AccessPolicy
from fhirkit.api.router import Operation
from servicekit import topology
from servicekit.app import ServiceDefinition
from servicekit.migrations import Lineage

LINEAGE = Lineage("directory", Path(__file__).resolve().parent / "migrations", "directory_alembic_version")
OPERATIONS_BASE = "http://hl7.org/fhir/OperationDefinition"

DEFINITION = ServiceDefinition(
    name="directory",
    title="Alliance directory: organization tree, practitioners and master patient index",
    resource_types=topology.DIRECTORY_TYPES,
    hooks={"Organization": OrganizationHooks(), "Patient": PatientHooks()},
    operations=[
        Operation("match", matching.patient_match, ("Patient",), type_level=True, writes=False,
                  definition=f"{OPERATIONS_BASE}/Patient-match"),
        Operation("ihe-pix", matching.patient_ihe_pix, ("Patient",), type_level=True, methods=("GET", "POST"),
                  writes=False, definition="https://profiles.ihe.net/ITI/PIXm/OperationDefinition/IHE.PIXm.pix"),
        Operation("merge", matching.patient_merge, ("Patient",), type_level=True,
                  definition="http://hl7.org/fhir/5.0/OperationDefinition/Patient-merge"),
    ],
    lineages=[LINEAGE],
    # Every member reads the directory (it refers patients to each other); each record is
    # changed only by the organization that created it.
    access=AccessPolicy(public_types=topology.DIRECTORY_TYPES),
)

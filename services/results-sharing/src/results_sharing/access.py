"""Who sees which shared results (DOMAIN.md §3 and §6, fhirkit.access).

The producing center owns what it posts and always reads it. Another organization reads a
patient's results only through a grant of scope `results`: an open or recent referral or
teleconsultation involving it (granted from those services' Task events), or a recognition
check it made for the patient. A Provenance (a report's signature) is visible with its target. Catalogs, code systems, quality records and device records
(sterile packs and sterilizers) carry no patient data and are read by every member.
"""

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from fhirkit.access import AccessPolicy, HeldGrant, grant_access
from fhirkit.api.router import OperationCall
from fhirkit.store.tables import reference_index, resource
from servicekit.grants import TaskGrants

RESULTS_SCOPE = "results"

POLICY = AccessPolicy(
    public_types=frozenset({"CodeSystem", "ValueSet", "ConceptMap", "VerificationResult", "Device"}),
    parties={
        "Task": ("requester", "owner"),
        "SupplyDelivery": ("supplier", "receiver"),
        "ServiceRequest": ("requester", "performer"),
    },
    grant_scopes=frozenset({RESULTS_SCOPE}),
    # A report's signature is read with the report (the inviting party checks who signed it).
    follows={"Provenance": ("target",)},
)

# The same check repeated within a minute (an HIS asks again as the order is signed) leaves the
# grants' expiry where the first put it, at most a minute short of the configured hours, instead
# of rewriting every row each time.
RENEW_WITHIN = 60 * 1_000_000

GRANTS = TaskGrants(RESULTS_SCOPE, from_services=("referral", "telemedicine"))


def check_source(organization: str) -> str:
    """The grants source of an organization's recognition checks (one per organization)."""
    return f"recognition-check#{organization}"


async def grant_checked_results(
    call: OperationCall, patient_id: str, requester: str, results: list[tuple[str, str]],
    held: Iterable[HeldGrant] | None = None,
) -> None:
    """A recognition check is made for the patient in front of the caller's doctor: the caller may
    read the results it returned (and a report's member observations) for a while. Only for its
    own organization: naming another requester answers the question but opens nothing. `held`:
    the grants the caller's checks already hold of the patient, if the check read them."""
    organization = getattr(call.caller, "organization", None)
    if organization != requester or not results:
        return
    conn = call.repo.conn
    now = call.repo.config.clock()
    hours = call.request.app.state.settings.recognition_grant_hours
    await grant_access(
        conn, grantee=organization, patient=f"Patient/{patient_id}", scope=RESULTS_SCOPE,
        source=check_source(organization), reason="$recognition-check", now=now,
        expires_at=now + int(hours * 3600 * 1_000_000), targets=[*results, *await _report_members(conn, results)],
        renew_within=RENEW_WITHIN, writing=call.writing, held=held,
    )


async def _report_members(conn: AsyncConnection, results: list[tuple[str, str]]) -> list[tuple[str, str]]:
    reports = [resource_id for resource_type, resource_id in results if resource_type == "DiagnosticReport"]
    if not reports:
        return []
    stmt = (
        select(reference_index.c.target_type, reference_index.c.target_id)
        .join(resource, resource.c.rid == reference_index.c.rid)
        .where(resource.c.resource_type == "DiagnosticReport", resource.c.resource_id.in_(reports),
               reference_index.c.param == "result", reference_index.c.target_id.is_not(None))
    )
    return [(row[0], row[1]) for row in await conn.execute(stmt)]

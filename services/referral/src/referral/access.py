"""Who sees which referral records (DOMAIN.md §6, fhirkit.access).

Sender and receiver of a referral are its parties; every hop of a chain (one `requisition`) is
visible to the parties of any hop, so the original sender follows the referral up the tiers; a
Task and a Provenance are visible to whoever sees the ServiceRequest or Task they are about. The
county referral desk sees referrals that have no receiver yet. A grant of scope `referral`
(written when a referral is submitted to a receiver) opens the patient's clinical context held
here (conditions, encounters, care plans) to the receiving organization.
"""

from typing import Any

from sqlalchemy import ColumnElement, and_, exists, not_, or_, select
from sqlalchemy.sql.expression import FromClause

from fhirkit.access import AccessPolicy
from fhirkit.store.tables import reference_index
from servicekit.grants import OPEN, TaskGrants

REFERRAL_SCOPE = "referral"
UNADDRESSED = {"Task": "owner", "ServiceRequest": "performer"}


def _referral_desk(caller: Any, target: FromClause) -> ColumnElement[bool] | None:
    """The county hospital's referral desk assigns referrals nobody was named to receive."""
    if getattr(caller, "level", None) != "county":
        return None
    clauses = []
    for resource_type, param in UNADDRESSED.items():
        ref = reference_index.alias()
        addressed = exists(select(ref.c.rid).where(ref.c.rid == target.c.rid, ref.c.param == param))
        clauses.append(and_(target.c.resource_type == resource_type, not_(addressed)))

    return or_(*clauses)


POLICY = AccessPolicy(
    parties={
        "ServiceRequest": ("requester", "performer"),
        "Task": ("requester", "owner"),
        "Encounter": ("service-provider",),
        "EpisodeOfCare": ("organization",),
        "CarePlan": ("performer",),
        "CareTeam": ("participant",),
    },
    chains={"ServiceRequest": "requisition"},
    follows={"Task": ("focus", "part-of"), "Provenance": ("target",)},
    grant_scopes=frozenset({REFERRAL_SCOPE}),
    granted_types=frozenset({"Condition", "Encounter", "EpisodeOfCare", "CareTeam", "CarePlan"}),
    extra=_referral_desk,
)

# The receiver reviews the patient's clinical context from the moment a referral reaches it.
GRANTS = TaskGrants(REFERRAL_SCOPE, receiver_from=OPEN | {"completed"}, from_services=("referral",))

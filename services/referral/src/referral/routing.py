"""What a referral ServiceRequest must carry and where it may go (DOMAIN.md §2, routing rules).

An upward referral goes to a higher tier, a downward one to a lower tier, a lateral one to the
same tier; sender and receiver must belong to the same alliance (the county hospital and
everything under it) or the receiver must be one of the upper-level partner hospitals the
county hospital is `partOf`. Organizations are read through the directory's API.
"""

from typing import Any

from fhirkit.errors import BusinessRuleViolation
from fhirkit.store.hooks import WriteContext
from referral import follow_up, green_channel
from servicekit.tiers import FACILITY_LEVEL_SYSTEM, Directory, Place, organization_of, place, same_alliance

__all__ = ["FACILITY_LEVEL_SYSTEM", "Directory", "Place", "ReferralRequestHooks", "check_route", "place",
           "referral_direction", "same_alliance", "sending_organization"]

BASE = "http://county-alliance.org/fhir"
REFERRAL_CATEGORY_SYSTEM = f"{BASE}/CodeSystem/referral-category"
DIRECTIONS = {"upward-referral", "downward-referral", "lateral-referral"}


def referral_direction(request: dict[str, Any]) -> str | None:
    for concept in request.get("category") or []:
        for coding in concept.get("coding") or []:
            if coding.get("system") == REFERRAL_CATEGORY_SYSTEM:
                return coding.get("code")
    return None


class ReferralRequestHooks:
    async def before_write(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        if resource is None:
            return
        direction = referral_direction(resource)
        if direction is None:
            return  # a general order (as in many official examples) is stored as it is
        if direction not in DIRECTIONS:
            raise BusinessRuleViolation(
                f"ServiceRequest.category '{direction}' is not a referral category "
                f"({', '.join(sorted(DIRECTIONS))})",
                expression=["ServiceRequest.category"],
            )
        _require_content(resource)
        if direction == "downward-referral":
            follow_up.require_care_plan(resource)
        directory: Directory = repo.config.references
        sender = await place(directory, await sending_organization(directory, resource))
        pathway = green_channel.check_request(resource)
        if pathway is not None:
            await green_channel.route_to_center(directory, resource, pathway, sender.county)
        receivers = [r.get("reference") for r in resource.get("performer") or [] if isinstance(r, dict)]
        for receiver in receivers:
            if isinstance(receiver, str) and receiver.startswith("Organization/"):
                check_route(direction, sender, await place(directory, receiver))

    async def after_write(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        return None


def _require_content(request: dict[str, Any]) -> None:
    missing = [name for name, present in (
        ("subject", bool(request.get("subject"))),
        ("requester", bool(request.get("requester"))),
        ("reasonCode or reasonReference", bool(request.get("reasonCode") or request.get("reasonReference"))),
        ("priority", bool(request.get("priority"))),
    ) if not present]
    if missing:
        raise BusinessRuleViolation(
            f"A referral needs {', '.join(missing)}",
            expression=[f"ServiceRequest.{m.split(' ')[0]}" for m in missing],
        )
    subject = (request.get("subject") or {}).get("reference", "")
    if not subject.startswith("Patient/"):
        raise BusinessRuleViolation("A referral's subject is a Patient", expression=["ServiceRequest.subject"])


async def sending_organization(directory: Directory, request: dict[str, Any]) -> str:
    requester = (request.get("requester") or {}).get("reference", "")
    organization = await organization_of(directory, requester, "ServiceRequest.requester")
    if organization:
        return organization
    raise BusinessRuleViolation(
        "A referral's requester is the sending Organization or a PractitionerRole at it",
        expression=["ServiceRequest.requester"],
    )


def check_route(direction: str, sender: Place, receiver: Place) -> None:
    if sender.rank is None or receiver.rank is None:
        raise BusinessRuleViolation(
            "Referral routing needs both organizations to carry a facility level "
            f"({sender.organization}: {sender.code}, {receiver.organization}: {receiver.code})",
            expression=["ServiceRequest.performer"],
        )
    wrong = (
        (direction == "upward-referral" and receiver.rank <= sender.rank)
        or (direction == "downward-referral" and receiver.rank >= sender.rank)
        or (direction == "lateral-referral" and receiver.rank != sender.rank)
    )
    if wrong:
        raise BusinessRuleViolation(
            f"An {direction} goes {_expected(direction)}; {receiver.organization} ({receiver.code}) is not "
            f"{_expected(direction)} {sender.organization} ({sender.code})",
            expression=["ServiceRequest.performer"],
        )
    if not same_alliance(sender, receiver):
        raise BusinessRuleViolation(
            f"{receiver.organization} is outside the alliance of {sender.organization} and its partner hospitals",
            expression=["ServiceRequest.performer"],
        )


def _expected(direction: str) -> str:
    return {"upward-referral": "to a higher tier than", "downward-referral": "to a lower tier than",
            "lateral-referral": "to the same tier as"}[direction]

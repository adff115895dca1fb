"""What a referral ServiceRequest must carry and where it may go (DOMAIN.md §2, routing rules).

An upward referral goes to a higher tier, a downward one to a lower tier, a lateral one to the
same tier; sender and receiver must belong to the same alliance (the county hospital and
everything under it) or the receiver must be one of the upper-level partner hospitals the
county hospital is `partOf`. Organizations are read through the directory's API.
"""

from dataclasses import dataclass
from typing import Any, Protocol

from fhirkit.errors import BusinessRuleViolation, UnprocessableEntity
from fhirkit.store.hooks import WriteContext
from referral import follow_up, green_channel

BASE = "http://county-alliance.org/fhir"
REFERRAL_CATEGORY_SYSTEM = f"{BASE}/CodeSystem/referral-category"
FACILITY_LEVEL_SYSTEM = f"{BASE}/CodeSystem/facility-level"
DIRECTIONS = {"upward-referral", "downward-referral", "lateral-referral"}
TIER_RANK = {"village-clinic": 1, "township-health-center": 2, "county-hospital": 3, "city-hospital": 4,
             "provincial-hospital": 5}
CENTER_RANK = 3  # the shared and emergency centers are part of the county hospital
MAX_DEPTH = 8


class Directory(Protocol):
    async def read(self, resource_type: str, resource_id: str) -> dict[str, Any] | None: ...

    async def search(self, resource_type: str, params: list[tuple[str, str]]) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class Place:
    organization: str  # Organization/id
    code: str | None
    rank: int | None
    county: str | None  # the county hospital above (or at) it
    ancestors: tuple[str, ...]


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
    if requester.startswith("Organization/"):
        return requester
    if requester.startswith("PractitionerRole/"):
        role = await directory.read("PractitionerRole", requester.split("/", 1)[1])
        organization = ((role or {}).get("organization") or {}).get("reference")
        if organization:
            return organization
        raise UnprocessableEntity(f"{requester} names no organization", expression=["ServiceRequest.requester"])
    raise BusinessRuleViolation(
        "A referral's requester is the sending Organization or a PractitionerRole at it",
        expression=["ServiceRequest.requester"],
    )


async def place(directory: Directory, organization: str) -> Place:
    chain: list[dict[str, Any]] = []
    current: str | None = organization
    while current and len(chain) < MAX_DEPTH:
        resource = await directory.read("Organization", current.split("/", 1)[1])
        if resource is None:
            raise UnprocessableEntity(f"{current} does not exist in the directory")
        chain.append(resource)
        current = (resource.get("partOf") or {}).get("reference")
    code = _facility(chain[0])
    rank = TIER_RANK.get(code or "", CENTER_RANK if code else None)
    county = next((f"Organization/{o['id']}" for o in chain if _facility(o) == "county-hospital"), None)
    return Place(organization, code, rank, county, tuple(f"Organization/{o['id']}" for o in chain[1:]))


def _facility(organization: dict[str, Any]) -> str | None:
    for concept in organization.get("type") or []:
        for coding in concept.get("coding") or []:
            if coding.get("system") == FACILITY_LEVEL_SYSTEM:
                return coding.get("code")
    return None


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


def same_alliance(a: Place, b: Place) -> bool:
    if a.county and a.county == b.county:
        return True
    # Upper-level partners: the receiver (or sender) is above the other's county hospital.
    return a.organization in b.ancestors or b.organization in a.ancestors

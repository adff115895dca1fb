"""Where an organization sits in the alliance, read through the directory's API: its facility level
(tier), the county hospital above it and its ancestors up to the upper-level partner hospitals.

Referral routing and telemedicine invitations both go by it: an organization is in the alliance of
another when the same county hospital is above both, and the city and provincial partner hospitals
are the ones the county hospital is `partOf`.
"""

from dataclasses import dataclass
from typing import Any, Protocol

from fhirkit.errors import UnprocessableEntity

FACILITY_LEVEL_SYSTEM = "http://county-alliance.org/fhir/CodeSystem/facility-level"
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


async def place(directory: Directory, organization: str) -> Place:
    chain: list[dict[str, Any]] = []
    current: str | None = organization
    while current and len(chain) < MAX_DEPTH:
        resource = await directory.read("Organization", current.split("/", 1)[1])
        if resource is None:
            raise UnprocessableEntity(f"{current} does not exist in the directory")
        chain.append(resource)
        current = (resource.get("partOf") or {}).get("reference")
    code = facility(chain[0])
    rank = TIER_RANK.get(code or "", CENTER_RANK if code else None)
    county = next((f"Organization/{o['id']}" for o in chain if facility(o) == "county-hospital"), None)
    return Place(organization, code, rank, county, tuple(f"Organization/{o['id']}" for o in chain[1:]))


def facility(organization: dict[str, Any]) -> str | None:
    for concept in organization.get("type") or []:
        for coding in concept.get("coding") or []:
            if coding.get("system") == FACILITY_LEVEL_SYSTEM:
                return coding.get("code")
    return None


def same_alliance(a: Place, b: Place) -> bool:
    if a.county and a.county == b.county:
        return True
    # Upper-level partners: the receiver (or sender) is above the other's county hospital.
    return a.organization in b.ancestors or b.organization in a.ancestors


async def organization_of(directory: Directory, reference: str, expression: str) -> str | None:
    """The Organization a requester/performer reference acts for: itself, or a PractitionerRole's
    organization (None for any other kind of reference)."""
    if reference.startswith("Organization/"):
        return reference
    if reference.startswith("PractitionerRole/"):
        role = await directory.read("PractitionerRole", reference.split("/", 1)[1])
        organization = ((role or {}).get("organization") or {}).get("reference")
        if isinstance(organization, str) and organization:
            return organization
        raise UnprocessableEntity(f"{reference} names no organization", expression=[expression])
    return None

"""Where an organization stands, for the scope rule: which alliance, city and province.

A quality evaluation's scope says who may recognize the center's results: `alliance` the members
of its county alliance (the county hospital and everything under it), `city` those in its city,
`provincial` its province, `national` everyone. The alliance is read from the `partOf` tree, the
city and province from the address (`city`, `state`) of the nearest organization up the tree that
has one (the shared centers carry none of their own). Organizations are read through the
directory's API (`servicekit.peers`, cached briefly), never from its tables.
"""

from dataclasses import dataclass
from typing import Any, Protocol

from fhirkit.errors import UnprocessableEntity
from results_sharing.vocabulary import FACILITY_LEVEL, code_in

MAX_DEPTH = 8


class Directory(Protocol):
    async def read(self, resource_type: str, resource_id: str) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class Place:
    organization: str  # Organization/id
    facility: str | None
    county: str | None  # the county hospital above (or at) it: the alliance
    city: str | None
    province: str | None


async def place_of(directory: Directory, organization: str) -> Place:
    chain: list[dict[str, Any]] = []
    current: str | None = organization
    while current and current.startswith("Organization/") and len(chain) < MAX_DEPTH:
        found = await directory.read("Organization", current.split("/", 1)[1])
        if found is None:
            raise UnprocessableEntity(f"{current} does not exist in the directory")
        chain.append(found)
        current = (found.get("partOf") or {}).get("reference")
    if not chain:
        raise UnprocessableEntity(f"'{organization[:80]}' is not an Organization reference")
    county = next((f"Organization/{o['id']}" for o in chain if code_in(o.get("type"), FACILITY_LEVEL) == "county-hospital"),
                  None)
    address = next((a for o in chain for a in o.get("address") or [] if a.get("city") or a.get("state")), {})
    return Place(organization, code_in(chain[0].get("type"), FACILITY_LEVEL), county, address.get("city"),
                 address.get("state"))


def covers(scope: str, producer: Place, requester: Place) -> bool:
    """Whether a quality evaluation at `scope` for the producer covers this requester."""
    same_alliance = producer.county is not None and producer.county == requester.county
    same_province = producer.province is not None and producer.province == requester.province
    if scope == "national" or same_alliance:
        return True
    if scope == "provincial":
        return same_province
    if scope == "city":
        return same_province and producer.city is not None and producer.city == requester.city
    return False

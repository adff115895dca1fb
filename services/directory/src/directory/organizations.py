"""The organization tree: an Organization's facility level must fit its `partOf` parent.

Only organizations that carry a facility-level code are held to the alliance's tree rules (other
organizations, such as insurers in the official examples, may be stored as they are); cycles are
refused for everyone, because hierarchy searches walk `partOf`.
"""

from typing import Any

from directory import identifiers
from fhirkit.errors import BusinessRuleViolation, InvalidRequest
from fhirkit.store.hooks import WriteContext
from fhirkit.store.repository import Repository

MAX_DEPTH = 32


def facility_code(organization: dict[str, Any]) -> str | None:
    for concept in organization.get("type") or []:
        for coding in (concept or {}).get("coding") or []:
            if coding.get("system") == identifiers.FACILITY_LEVEL_SYSTEM:
                return coding.get("code")
    return None


def parent_id(organization: dict[str, Any]) -> str | None:
    reference = (organization.get("partOf") or {}).get("reference")
    if not isinstance(reference, str) or not reference.startswith("Organization/"):
        return None
    return reference.split("/")[1]


class OrganizationHooks:
    async def before_write(self, repo: Repository, resource: dict[str, Any] | None, context: WriteContext) -> None:
        if resource is None:
            await _refuse_delete_with_children(repo, context.resource_id)
            return
        code = facility_code(resource)
        if code is not None and code not in identifiers.FACILITY_CODES:
            raise InvalidRequest(
                f"Organization.type: '{code}' is not a code of {identifiers.FACILITY_LEVEL_SYSTEM}",
                expression=["Organization.type"],
            )
        parent = parent_id(resource)
        if parent is not None:
            await _check_parent(repo, context.resource_id, code, parent)
        elif code is not None and not identifiers.may_be_root(code):
            raise BusinessRuleViolation(
                f"A {identifiers.FACILITY_CODES[code].display} ({code}) must be partOf the organization above it",
                expression=["Organization.partOf"],
            )
        if code is not None:
            await _check_children(repo, context.resource_id, code)

    async def after_write(self, repo: Repository, resource: dict[str, Any] | None, context: WriteContext) -> None:
        return None


async def _parent(repo: Repository, organization_id: str) -> dict[str, Any] | None:
    if not await repo.exists("Organization", organization_id):
        return None
    return (await repo.read("Organization", organization_id)).parsed()


async def _check_parent(repo: Repository, own_id: str, code: str | None, parent: str) -> None:
    if parent == own_id:
        raise BusinessRuleViolation("An organization cannot be partOf itself", expression=["Organization.partOf"])
    parent_resource = await _parent(repo, parent)
    if parent_resource is None:
        raise BusinessRuleViolation(
            f"Organization.partOf refers to Organization/{parent}, which does not exist",
            expression=["Organization.partOf"],
        )
    parent_code = facility_code(parent_resource)
    if code is not None and parent_code is not None:
        allowed = identifiers.allowed_parent_codes(code)
        if parent_code not in allowed:
            wanted = " or ".join(sorted(allowed)) or "nothing (it is the top tier)"
            raise BusinessRuleViolation(
                f"A {code} cannot be partOf a {parent_code} (Organization/{parent}); its parent must be {wanted}",
                expression=["Organization.partOf"],
            )
    await _check_no_cycle(repo, own_id, parent)


async def _check_no_cycle(repo: Repository, own_id: str, parent: str) -> None:
    current: str | None = parent
    for _ in range(MAX_DEPTH):
        if current is None:
            return
        if current == own_id:
            raise BusinessRuleViolation(
                f"Organization.partOf Organization/{parent} would make a cycle through Organization/{own_id}",
                expression=["Organization.partOf"],
            )
        resource = await _parent(repo, current)
        current = parent_id(resource) if resource else None
    raise BusinessRuleViolation(f"The partOf chain above Organization/{parent} is deeper than {MAX_DEPTH}")


async def _children(repo: Repository, organization_id: str) -> list[dict[str, Any]]:
    from fhirkit.search.request import parse_search

    request = parse_search("Organization", [("partof", f"Organization/{organization_id}"), ("_count", "1000")])
    request.total = "none"
    page = await repo.search(request)
    return [match.parsed() for match in page.matches]


async def _check_children(repo: Repository, own_id: str, code: str) -> None:
    for child in await _children(repo, own_id):
        child_code = facility_code(child)
        if child_code is not None and code not in identifiers.allowed_parent_codes(child_code):
            raise BusinessRuleViolation(
                f"Organization/{own_id} cannot become a {code}: Organization/{child['id']} ({child_code}) is partOf it",
                expression=["Organization.type"],
            )


async def _refuse_delete_with_children(repo: Repository, own_id: str) -> None:
    children = await _children(repo, own_id)
    if children:
        raise BusinessRuleViolation(
            f"Organization/{own_id} still has {len(children)} organizations partOf it "
            f"(e.g. Organization/{children[0]['id']}); move or delete them first"
        )

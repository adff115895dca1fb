"""When a pack may leave the CSSD or be opened (WS 310.3): its release status.

A pack is released when its cycle completed, no monitoring result of that cycle failed, no
recall implicates it, it has not expired and, for an implant, its load's biological indicator
passed. The same answer serves the store hooks (which refuse a delivery or a use of a pack on
hold) and `Device/$trace` (which reports it).
"""

import calendar
from dataclasses import dataclass
from datetime import UTC
from typing import Any

from fhirkit.errors import BusinessRuleViolation, ResourceGone, ResourceNotFound
from fhirkit.search.values import date_range, from_micros, to_micros
from results_sharing.sterile import codes, links, queries

RETENTION_YEARS = 3
CLOSED_ISSUE_STATUSES = {"cancelled", "entered-in-error"}


@dataclass(frozen=True)
class Hold:
    rule: str  # a code of codes.RULE
    message: str


def violation(rule: str, message: str, expression: list[str]) -> BusinessRuleViolation:
    """A 422 that names the rule both in words and as a coding a client can branch on."""
    return BusinessRuleViolation(
        f"{message} (rule {rule}: {codes.display(codes.RULE, rule)})",
        expression=expression,
        details={"coding": [codes.coding(codes.RULE, rule)]},
    )


def moment(value: Any) -> int | None:
    """The start of a FHIR date/dateTime (µs), None when absent or not a date."""
    found = date_range(value) if isinstance(value, str) else None
    return found[0] if found else None


def start_of(resource: dict[str, Any], prefix: str) -> int | None:
    """The start of `<prefix>DateTime` or `<prefix>Period.start` (performed, effective, occurrence)."""
    period = resource.get(f"{prefix}Period")
    return moment(resource.get(f"{prefix}DateTime")) or moment(period.get("start") if isinstance(period, dict) else None)


def years_after(micros: int, years: int) -> int:
    """The same calendar instant `years` later (29 February becomes 28 February)."""
    when = from_micros(micros).astimezone(UTC)
    year = when.year + years
    day = min(when.day, calendar.monthrange(year, when.month)[1])
    return to_micros(when.replace(year=year, day=day))


def require_retained(recorded: int | None, now: int, what: str, expression: list[str]) -> None:
    if recorded is None or now < years_after(recorded, RETENTION_YEARS):
        raise violation(
            "retention",
            f"{what} is a sterilization record younger than {RETENTION_YEARS} years and cannot be deleted",
            expression,
        )


async def read_local(repo: Any, resource_type: str, resource_id: str | None) -> dict[str, Any] | None:
    """A resource as the server sees it: a rule about a pack holds whoever posts the write (the
    township center using a pack cannot read the center's cycle, yet its release depends on it)."""
    return await read_as(repo.unrestricted(), resource_type, resource_id)


async def read_as(reader: Any, resource_type: str, resource_id: str | None) -> dict[str, Any] | None:
    """A resource as `reader` may see it; None when absent, deleted or hidden from it."""
    if not resource_id:
        return None
    try:
        return (await reader.read(resource_type, resource_id)).parsed()
    except (ResourceNotFound, ResourceGone):
        return None


async def release_hold(repo: Any, pack: dict[str, Any], at: int) -> Hold | None:
    """Why the pack may not be distributed or used at `at`, or None when it is released."""
    load = await links.of_packs(repo.conn, [pack["id"]], [links.LOAD])
    if not load:
        return Hold("not-sterilized", "the pack is in no sterilization cycle")
    cycle = await read_local(repo, "Procedure", load[0].source_id)
    if cycle is None or cycle.get("status") != "completed":
        status = (cycle or {}).get("status", "missing")
        return Hold("not-sterilized", f"its cycle Procedure/{load[0].source_id} is {status}, not completed")
    results = await queries.cycle_results(repo.conn, load[0].source_id)
    failed = sorted(kind for kind, result in results if result == codes.FAIL)
    if failed:
        return Hold("load-failed", f"its load (Procedure/{load[0].source_id}) failed {', '.join(failed)} monitoring")
    recall = await open_recall_of(repo, pack["id"])
    if recall is not None:
        return Hold("recalled", f"the pack is under recall (DetectedIssue/{recall})")
    if codes.device_kind(pack) == codes.IMPLANT and (codes.BIOLOGICAL, codes.PASS) not in results:
        return Hold("implant-release", f"its load (Procedure/{load[0].source_id}) has no passing biological indicator yet")
    expiry = date_range(pack["expirationDate"]) if isinstance(pack.get("expirationDate"), str) else None
    if expiry is not None and at > expiry[1]:  # the whole expiry day is still good
        return Hold("expired", f"the pack expired on {pack['expirationDate']}")
    return None


async def open_recall_of(repo: Any, pack_id: str) -> str | None:
    """The id of a sterilization-failure DetectedIssue still implicating the pack, if any."""
    for issue in await queries.referencing(repo.conn, "DetectedIssue", "implicated", f"Device/{pack_id}"):
        if codes.FAILURE in codes.codes_in(issue.get("code"), codes.ISSUE) and (
            issue.get("status") not in CLOSED_ISSUE_STATUSES
        ):
            return str(issue["id"])
    return None

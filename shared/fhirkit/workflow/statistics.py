"""What the services' `$…-statistics` operations share: the period and who may ask, the workflow
Tasks of a period, when each Task first made a transition (from its Provenance), and the way
figures are written into a `Parameters` resource.

An organization sees its own figures; county-level callers (the alliance's operations staff) and
the platform see any organization's and the whole alliance's.
"""

import statistics as stats
from typing import Any

from fhirkit.api.router import OperationCall
from fhirkit.errors import Forbidden, InvalidRequest
from fhirkit.search.request import parse_search
from fhirkit.search.values import date_range, format_instant
from fhirkit.workflow.deadlines import search_all
from fhirkit.workflow.machine import reference_of

BATCH = 100


def period_of(call: OperationCall, operation: str) -> tuple[str, int, int]:
    """The `period` input (a date of any precision or start/end) and its bounds in µs."""
    text = call.parameter("period")
    if not isinstance(text, str) or date_range(text.split("/")[0]) is None:
        raise InvalidRequest(f"${operation} needs period=YYYY, YYYY-MM, YYYY-MM-DD or start/end")
    start, _, end = text.partition("/")
    low = date_range(start)
    high = date_range(end) if end else low
    if low is None or high is None:
        raise InvalidRequest(f"period '{text[:40]}' is not a date or date range")
    return text, low[0], high[1]


def organization_scope(call: OperationCall, what: str) -> str | None:
    """The organization the figures are about (None: the whole alliance), if the caller may see them."""
    requested = call.parameter("organization")
    if isinstance(requested, dict):  # given as a valueReference
        requested = requested.get("reference")
    own = getattr(call.caller, "organization", None)
    operations_staff = getattr(call.caller, "level", None) == "county" or "system" in getattr(call.caller, "roles", ())
    if requested is None:
        return None if operations_staff else own
    if not isinstance(requested, str) or not requested.startswith("Organization/"):
        raise InvalidRequest("organization must be an Organization reference")
    if requested != own and not operations_staff:
        raise Forbidden(f"An organization sees its own {what} statistics; alliance-wide figures are for operations staff")
    return requested


async def tasks_in_period(repo: Any, code_tokens: list[str], low: int, high: int,
                          organization: str | None) -> list[dict[str, Any]]:
    """Tasks of these codes authored in [low, high], those `organization` sent or received."""
    base = [("code", ",".join(code_tokens)), ("authored-on", f"ge{format_instant(low)}"),
            ("authored-on", f"le{format_instant(high)}")]
    searches = [base] if organization is None else [[*base, ("owner", organization)], [*base, ("requester", organization)]]
    found: dict[str, dict[str, Any]] = {}
    for params in searches:
        for match in await search_all(repo, "Task", params):
            found.setdefault(match.resource_id, match.parsed())
    return list(found.values())


async def focus_requests(repo: Any, tasks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`ServiceRequest/id` → the request each Task is about."""
    ids = sorted({(reference_of(t.get("focus")) or "").split("/", 1)[-1] for t in tasks} - {""})
    found: dict[str, dict[str, Any]] = {}
    for start in range(0, len(ids), BATCH):
        request = parse_search("ServiceRequest", [("_id", ",".join(ids[start:start + BATCH])), ("_count", str(BATCH))])
        request.total = "none"
        for match in (await repo.search(request)).matches:
            found[f"ServiceRequest/{match.resource_id}"] = match.parsed()
    return found


async def transition_times(repo: Any, tasks: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Task id → operation (`accept`, `complete`, …) → when it was first made (µs), from Provenance."""
    times: dict[str, dict[str, int]] = {}
    ids = [t["id"] for t in tasks]
    for start in range(0, len(ids), BATCH):
        targets = ",".join(f"Task/{i}" for i in ids[start:start + BATCH])
        request = parse_search("Provenance", [("target", targets), ("_count", "1000")])
        request.total = "none"
        for match in (await repo.search(request)).matches:
            record = match.parsed()
            code = ((record.get("activity") or {}).get("coding") or [{}])[0].get("code")
            recorded = date_range(record.get("recorded", ""))
            task_id = (record.get("target") or [{}])[0].get("reference", "").split("/")[1]
            if code and recorded:
                moments = times.setdefault(task_id, {})
                moments[code] = min(moments.get(code, recorded[0]), recorded[0])
    return times


def instant(text: Any) -> int | None:
    bounds = date_range(text) if isinstance(text, str) else None
    return bounds[0] if bounds else None


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    if fraction == 0.5:
        return round(stats.median(values), 2)
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return round(ordered[index], 2)


def figure(name: str, value: Any) -> dict[str, Any]:
    """One `Parameters.parameter`: a dict becomes parts, None `n/a`, ints and decimals their values."""
    if isinstance(value, dict):
        return {"name": name, "part": [figure(key, inner) for key, inner in value.items()]}
    if value is None:
        return {"name": name, "valueString": "n/a"}
    if isinstance(value, str):
        return {"name": name, "valueString": value}
    if isinstance(value, int):
        return {"name": name, "valueInteger": value}
    return {"name": name, "valueDecimal": value}

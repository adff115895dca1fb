"""`$referral-statistics`: what the alliance's operations staff report on (DOMAIN.md §2).

For referral Tasks authored in the period (optionally those an organization sent or received):
upward/downward/lateral counts, acceptance rate (accepted ÷ answered), median and 90th percentile
response time (sent → accepted or rejected, from the transitions' Provenance), deadline
compliance (answered before `restriction.period.end` ÷ answered, plus unanswered overdue ones)
and green-channel door-to-decision times per pathway. An organization sees its own figures;
county-level callers (the alliance's operations staff) see any organization's and the whole
alliance's.
"""

import statistics as stats
from collections import Counter, defaultdict
from typing import Any

import orjson

from fhirkit.api.interactions import Result
from fhirkit.api.router import OperationCall
from fhirkit.errors import Forbidden, InvalidRequest
from fhirkit.search.request import parse_search
from fhirkit.search.values import date_range
from referral import green_channel, routing, workflow

ANSWERS = {"accept": "accepted", "reject": "rejected"}
ACCEPTED_STATUSES = {"accepted", "in-progress", "completed", "failed"}
PAGE = 500
PROVENANCE_BATCH = 100


async def referral_statistics(call: OperationCall) -> Result:
    period = call.parameter("period")
    if not isinstance(period, str) or date_range(period.split("/")[0]) is None:
        raise InvalidRequest("$referral-statistics needs period=YYYY, YYYY-MM, YYYY-MM-DD or start/end")
    low, high = _period(period)
    organization = _organization(call)
    tasks = await _tasks(call.repo, low, high, organization)
    requests = await _requests(call.repo, tasks)
    answers = await _answers(call.repo, tasks)
    figures = compute(tasks, requests, answers, now=call.repo.config.clock())
    parameters = [{"name": "period", "valueString": period}]
    if organization:
        parameters.append({"name": "organization", "valueReference": {"reference": organization}})
    parameters += [_figure(name, value) for name, value in figures.items()]
    return Result(200, orjson.dumps({"resourceType": "Parameters", "parameter": parameters}))


def _period(text: str) -> tuple[int, int]:
    start, _, end = text.partition("/")
    low = date_range(start)
    high = date_range(end) if end else low
    if low is None or high is None:
        raise InvalidRequest(f"period '{text[:40]}' is not a date or date range")
    return low[0], high[1]


def _organization(call: OperationCall) -> str | None:
    requested = call.parameter("organization")
    own = getattr(call.caller, "organization", None)
    operations_staff = getattr(call.caller, "level", None) == "county" or "system" in getattr(call.caller, "roles", ())
    if requested is None:
        return None if operations_staff else own
    if not isinstance(requested, str) or not requested.startswith("Organization/"):
        raise InvalidRequest("organization must be an Organization reference")
    if requested != own and not operations_staff:
        raise Forbidden("An organization sees its own referral statistics; alliance-wide figures are for operations staff")
    return requested


async def _tasks(repo: Any, low: int, high: int, organization: str | None) -> list[dict[str, Any]]:
    from fhirkit.search.values import format_instant

    base = [("code", f"{workflow.TASK_CODE_SYSTEM}|referral"),
            ("authored-on", f"ge{format_instant(low)}"), ("authored-on", f"le{format_instant(high)}"),
            ("_count", str(PAGE))]
    searches = [base] if organization is None else [[*base, ("owner", organization)], [*base, ("requester", organization)]]
    found: dict[str, dict[str, Any]] = {}
    for params in searches:
        cursor = None
        while True:
            request = parse_search("Task", params)
            request.total, request.cursor = "none", cursor
            page = await repo.search(request)
            for match in page.matches:
                found.setdefault(match.resource_id, match.parsed())
            if not page.next_cursor:
                break
            cursor = page.next_cursor
    return list(found.values())


async def _requests(repo: Any, tasks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    ids = sorted({(workflow.reference_of(t.get("focus")) or "").split("/", 1)[-1] for t in tasks} - {""})
    found: dict[str, dict[str, Any]] = {}
    for start in range(0, len(ids), PROVENANCE_BATCH):
        request = parse_search("ServiceRequest", [("_id", ",".join(ids[start:start + PROVENANCE_BATCH])),
                                                  ("_count", str(PROVENANCE_BATCH))])
        request.total = "none"
        for match in (await repo.search(request)).matches:
            found[f"ServiceRequest/{match.resource_id}"] = match.parsed()
    return found


async def _answers(repo: Any, tasks: list[dict[str, Any]]) -> dict[str, int]:
    """Task id → when it was first accepted or rejected (µs), from the transitions' Provenance."""
    answered: dict[str, int] = {}
    ids = [t["id"] for t in tasks]
    for start in range(0, len(ids), PROVENANCE_BATCH):
        targets = ",".join(f"Task/{i}" for i in ids[start:start + PROVENANCE_BATCH])
        request = parse_search("Provenance", [("target", targets), ("_count", "1000")])
        request.total = "none"
        for match in (await repo.search(request)).matches:
            record = match.parsed()
            code = ((record.get("activity") or {}).get("coding") or [{}])[0].get("code")
            recorded = date_range(record.get("recorded", ""))
            task_id = (record.get("target") or [{}])[0].get("reference", "").split("/")[1]
            if code in ANSWERS and recorded:
                answered[task_id] = min(answered.get(task_id, recorded[0]), recorded[0])
    return answered


def compute(tasks: list[dict[str, Any]], requests: dict[str, dict[str, Any]], answers: dict[str, int],
            *, now: int) -> dict[str, Any]:
    directions: Counter[str] = Counter()
    accepted = rejected = on_time = late = overdue_open = 0
    response_minutes: list[float] = []
    door_to_decision: dict[str, list[float]] = defaultdict(list)
    for task in tasks:
        request = requests.get(workflow.reference_of(task.get("focus")) or "", {})
        directions[routing.referral_direction(request) or "unknown"] += 1
        sent, due = _instant(task.get("authoredOn")), _instant(_deadline(task))
        answer = answers.get(task["id"])
        if task.get("status") in ACCEPTED_STATUSES:
            accepted += 1
        elif task.get("status") == "rejected":
            rejected += 1
        if answer is not None and sent is not None:
            response_minutes.append((answer - sent) / 60_000_000)
            if due is not None:
                on_time, late = (on_time + 1, late) if answer <= due else (on_time, late + 1)
        elif answer is None and due is not None and now > due and task.get("status") in ("requested", "received"):
            overdue_open += 1
        pathway = green_channel.pathway(request)
        moments = green_channel.timeline(task)
        if pathway and "sent" in moments and "accepted" in moments:
            decision = _instant(moments["accepted"]) or 0
            door_to_decision[pathway].append((decision - (_instant(moments["sent"]) or 0)) / 60_000_000)
    answered = accepted + rejected
    return {
        "total": len(tasks),
        "upward": directions["upward-referral"],
        "downward": directions["downward-referral"],
        "lateral": directions["lateral-referral"],
        "accepted": accepted,
        "rejected": rejected,
        "acceptanceRate": round(accepted / answered, 4) if answered else None,
        "responseMinutesMedian": _percentile(response_minutes, 0.5),
        "responseMinutesP90": _percentile(response_minutes, 0.9),
        "answeredOnTime": on_time,
        "answeredLate": late,
        "unansweredOverdue": overdue_open,
        "deadlineCompliance": round(on_time / (on_time + late + overdue_open), 4) if on_time + late + overdue_open else None,
        "greenChannel": {p: {"count": len(v), "doorToDecisionMinutesMedian": _percentile(v, 0.5),
                             "doorToDecisionMinutesP90": _percentile(v, 0.9)} for p, v in sorted(door_to_decision.items())},
    }


def _deadline(task: dict[str, Any]) -> Any:
    return ((task.get("restriction") or {}).get("period") or {}).get("end")


def _instant(text: Any) -> int | None:
    bounds = date_range(text) if isinstance(text, str) else None
    return bounds[0] if bounds else None


def _percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    if fraction == 0.5:
        return round(stats.median(values), 2)
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return round(ordered[index], 2)


def _figure(name: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return {"name": name, "part": [_figure(key, inner) for key, inner in value.items()]}
    if value is None:
        return {"name": name, "valueString": "n/a"}
    if isinstance(value, int):
        return {"name": name, "valueInteger": value}
    return {"name": name, "valueDecimal": value}

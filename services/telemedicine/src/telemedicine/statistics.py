"""`$telemedicine-statistics` and `$telemedicine-worklist` (system-level operations).

Statistics, for the telemedicine Tasks authored in the period (those an organization sent or
received, or all of them for the alliance's operations staff): volume per category, accepted,
declined, forwarded and completed counts, response time (sent → first accept or decline) and
report time (sent → completed) as median and 90th percentile minutes, deadline compliance (reports
issued before `restriction.period.end` ÷ those issued plus open overdue ones), and the same per
invited organization (`byInvitedParty`).

The worklist is `Task?owner=…&code=…&status=…` ordered by clinical priority, then deadline.
"""

from collections import Counter, defaultdict
from typing import Any

import orjson

from fhirkit.api.interactions import Result
from fhirkit.api.router import OperationCall
from fhirkit.errors import InvalidRequest
from fhirkit.store.repository import Repository
from fhirkit.workflow.deadlines import due_micros, search_all
from fhirkit.workflow.machine import reference_of
from fhirkit.workflow.statistics import (
    figure,
    focus_requests,
    instant,
    organization_scope,
    percentile,
    period_of,
    tasks_in_period,
    transition_times,
)
from servicekit.peers import SYSTEM_IDENTITY
from telemedicine.deadlines import OPEN
from telemedicine.vocabulary import TASK_CODE_SYSTEM, TASK_CODES, category_of

MINUTE = 60_000_000
PRIORITY_ORDER = {"stat": 0, "asap": 1, "urgent": 2, "routine": 3}


async def telemedicine_statistics(call: OperationCall) -> Result:
    period, low, high = period_of(call, "telemedicine-statistics")
    organization = organization_scope(call, "telemedicine")
    # Figures count records the caller may not read one by one (an invited party's other
    # requesters, the alliance as a whole): once the caller may see the figures, they are
    # computed as the platform; only counts and times leave this function.
    repo = Repository(call.repo.conn, call.repo.config, caller=SYSTEM_IDENTITY)
    codes = [f"{TASK_CODE_SYSTEM}|{code}" for code in sorted(TASK_CODES)]
    tasks = await tasks_in_period(repo, codes, low, high, organization)
    requests = await focus_requests(repo, tasks)
    times = await transition_times(repo, tasks)
    now = call.repo.config.clock()
    figures = compute(tasks, requests, times, now=now)
    by_party: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for task in tasks:
        by_party[reference_of(task.get("owner")) or "unassigned"].append(task)
    figures["byInvitedParty"] = {party: _party_figures(group, times, now) for party, group in sorted(by_party.items())}
    parameters: list[dict[str, Any]] = [{"name": "period", "valueString": period}]
    if organization:
        parameters.append({"name": "organization", "valueReference": {"reference": organization}})
    parameters += [figure(name, value) for name, value in figures.items()]
    return Result(200, orjson.dumps({"resourceType": "Parameters", "parameter": parameters}))


def compute(tasks: list[dict[str, Any]], requests: dict[str, dict[str, Any]], times: dict[str, dict[str, int]],
            *, now: int) -> dict[str, Any]:
    categories: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    response: list[float] = []
    for task in tasks:
        request = requests.get(reference_of(task.get("focus")) or "", {})
        categories[category_of(request) or "unknown"] += 1
        moments = times.get(task["id"], {})
        statuses[_outcome(task, moments)] += 1
        sent = instant(task.get("authoredOn"))
        answered = min((moments[c] for c in ("accept", "reject") if c in moments), default=None)
        if sent is not None and answered is not None:
            response.append((answered - sent) / MINUTE)
    figures: dict[str, Any] = {
        "total": len(tasks),
        "teleconsultation": categories["teleconsultation"],
        "remoteImaging": categories["remote-imaging"],
        "remoteEcg": categories["remote-ecg"],
        "remotePathology": categories["remote-pathology"],
        "accepted": statuses["accepted"] + statuses["completed"],
        "declined": statuses["declined"],
        "forwarded": statuses["forwarded"],
        "completed": statuses["completed"],
        "responseMinutesMedian": percentile(response, 0.5),
        "responseMinutesP90": percentile(response, 0.9),
    }
    figures.update(_report_figures(tasks, times, now))
    return figures


def _outcome(task: dict[str, Any], moments: dict[str, int]) -> str:
    business = [c.get("code") for c in (task.get("businessStatus") or {}).get("coding") or []]
    if "forwarded" in business:
        return "forwarded"
    if task.get("status") == "completed":
        return "completed"
    if task.get("status") == "rejected":
        return "declined"
    return "accepted" if "accept" in moments else "open"


def _report_figures(tasks: list[dict[str, Any]], times: dict[str, dict[str, int]], now: int) -> dict[str, Any]:
    on_time = late = overdue = 0
    report_minutes: list[float] = []
    for task in tasks:
        sent, due = instant(task.get("authoredOn")), due_micros(task)
        completed = times.get(task["id"], {}).get("complete")
        if completed is not None and sent is not None:
            report_minutes.append((completed - sent) / MINUTE)
        if completed is not None and due is not None:
            on_time, late = (on_time + 1, late) if completed <= due else (on_time, late + 1)
        elif completed is None and due is not None and now > due and task.get("status") in OPEN:
            overdue += 1
    counted = on_time + late + overdue
    return {
        "reportMinutesMedian": percentile(report_minutes, 0.5),
        "reportMinutesP90": percentile(report_minutes, 0.9),
        "completedOnTime": on_time,
        "completedLate": late,
        "openOverdue": overdue,
        "deadlineCompliance": round(on_time / counted, 4) if counted else None,
    }


def _party_figures(tasks: list[dict[str, Any]], times: dict[str, dict[str, int]], now: int) -> dict[str, Any]:
    figures = _report_figures(tasks, times, now)
    return {"total": len(tasks), "completedOnTime": figures["completedOnTime"],
            "completedLate": figures["completedLate"], "openOverdue": figures["openOverdue"],
            "deadlineCompliance": figures["deadlineCompliance"], "reportMinutesMedian": figures["reportMinutesMedian"]}


async def telemedicine_worklist(call: OperationCall) -> Result:
    """`$telemedicine-worklist?owner=Organization/x[&code=remote-diagnosis][&status=requested,accepted]`."""
    owner = call.parameter("owner")
    if not isinstance(owner, str) or not owner.startswith("Organization/"):
        raise InvalidRequest("$telemedicine-worklist needs owner=Organization/id")
    code = call.parameter("code") or ",".join(sorted(TASK_CODES))
    status = call.parameter("status") or ",".join(OPEN)
    if not isinstance(code, str) or not isinstance(status, str):
        raise InvalidRequest("code and status are comma-separated tokens")
    tokens = ",".join(c if "|" in c else f"{TASK_CODE_SYSTEM}|{c}" for c in code.split(","))
    matches = await search_all(call.repo, "Task", [("owner", owner), ("code", tokens), ("status", status)])
    tasks = sorted((m.parsed() for m in matches), key=_worklist_order)
    now = call.repo.config.clock()
    entries = [{"fullUrl": f"{call.options.base}/Task/{t['id']}", "resource": t,
                "search": {"mode": "match", "extension": _overdue_marker(t, now)}} for t in tasks]
    for entry in entries:
        if not entry["search"]["extension"]:
            del entry["search"]["extension"]
    body = {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries}
    return Result(200, orjson.dumps(body))


def _worklist_order(task: dict[str, Any]) -> tuple[int, int, str]:
    due = due_micros(task)
    return PRIORITY_ORDER.get(str(task.get("priority") or "routine"), 3), due if due is not None else 2**62, task["id"]


def _overdue_marker(task: dict[str, Any], now: int) -> list[dict[str, Any]]:
    due = due_micros(task)
    if due is None or now <= due:
        return []
    return [{"url": "http://county-alliance.org/fhir/StructureDefinition/worklist-overdue", "valueBoolean": True}]

"""`$referral-statistics`: what the alliance's operations staff report on (DOMAIN.md §2).

For referral Tasks authored in the period (optionally those an organization sent or received):
upward/downward/lateral counts, acceptance rate (accepted ÷ answered), median and 90th percentile
response time (sent → accepted or rejected, from the transitions' Provenance), deadline
compliance (answered before `restriction.period.end` ÷ answered, plus unanswered overdue ones)
and green-channel door-to-decision times per pathway. An organization sees its own figures;
county-level callers (the alliance's operations staff) see any organization's and the whole
alliance's.
"""

from collections import Counter, defaultdict
from typing import Any

import orjson

from fhirkit.api.interactions import Result
from fhirkit.api.router import OperationCall
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
from referral import green_channel, routing, workflow

ANSWERS = {"accept": "accepted", "reject": "rejected"}
ACCEPTED_STATUSES = {"accepted", "in-progress", "completed", "failed"}


async def referral_statistics(call: OperationCall) -> Result:
    period, low, high = period_of(call, "referral-statistics")
    organization = organization_scope(call, "referral")
    # Figures count every referral in scope, including hops the caller is not party to;
    # `organization_scope` has already decided which organizations' figures the caller may see.
    repo = call.repo.unrestricted()
    tasks = await tasks_in_period(repo, [f"{workflow.TASK_CODE_SYSTEM}|referral"], low, high, organization)
    requests = await focus_requests(repo, tasks)
    answers = _answers(await transition_times(repo, tasks))
    figures = compute(tasks, requests, answers, now=call.repo.config.clock())
    parameters = [{"name": "period", "valueString": period}]
    if organization:
        parameters.append({"name": "organization", "valueReference": {"reference": organization}})
    parameters += [figure(name, value) for name, value in figures.items()]
    return Result(200, orjson.dumps({"resourceType": "Parameters", "parameter": parameters}))


def _answers(times: dict[str, dict[str, int]]) -> dict[str, int]:
    """Task id → when it was first accepted or rejected (µs)."""
    return {task_id: min(moments[c] for c in ANSWERS if c in moments)
            for task_id, moments in times.items() if any(c in moments for c in ANSWERS)}


def compute(tasks: list[dict[str, Any]], requests: dict[str, dict[str, Any]], answers: dict[str, int],
            *, now: int) -> dict[str, Any]:
    directions: Counter[str] = Counter()
    accepted = rejected = on_time = late = overdue_open = 0
    response_minutes: list[float] = []
    door_to_decision: dict[str, list[float]] = defaultdict(list)
    for task in tasks:
        request = requests.get(workflow.reference_of(task.get("focus")) or "", {})
        directions[routing.referral_direction(request) or "unknown"] += 1
        sent, due = instant(task.get("authoredOn")), instant(_deadline(task))
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
            decision = instant(moments["accepted"]) or 0
            door_to_decision[pathway].append((decision - (instant(moments["sent"]) or 0)) / 60_000_000)
    answered = accepted + rejected
    return {
        "total": len(tasks),
        "upward": directions["upward-referral"],
        "downward": directions["downward-referral"],
        "lateral": directions["lateral-referral"],
        "accepted": accepted,
        "rejected": rejected,
        "acceptanceRate": round(accepted / answered, 4) if answered else None,
        "responseMinutesMedian": percentile(response_minutes, 0.5),
        "responseMinutesP90": percentile(response_minutes, 0.9),
        "answeredOnTime": on_time,
        "answeredLate": late,
        "unansweredOverdue": overdue_open,
        "deadlineCompliance": round(on_time / (on_time + late + overdue_open), 4) if on_time + late + overdue_open else None,
        "greenChannel": {p: {"count": len(v), "doorToDecisionMinutesMedian": percentile(v, 0.5),
                             "doorToDecisionMinutesP90": percentile(v, 0.9)} for p, v in sorted(door_to_decision.items())},
    }


def _deadline(task: dict[str, Any]) -> Any:
    return ((task.get("restriction") or {}).get("period") or {}).get("end")

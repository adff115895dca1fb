"""Response deadlines of referrals, and the sweep that escalates and expires overdue ones.

Deadlines are configuration (`ALLIANCE_REFERRAL_DEADLINES`, a JSON object of ISO 8601 durations
keyed by `green-channel`, a priority, or `<category>/<priority>`; `P2WD` means two working days).
A new referral Task gets `restriction.period.end` from them. The sweep runs with an explicit
`now`, so tests never sleep: an overdue Task is tagged `overdue` and escalated to the referral
desk (level 1), after another deadline's length to the county hospital (level 2); a routine
referral still unanswered after that is cancelled with reason `expired`.
"""

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fhirkit.search.values import date_range, format_instant, from_micros, to_micros
from fhirkit.workflow.deadlines import (  # re-exported: the referral modules and tests use these names
    ESCALATION,
    FLAG_SYSTEM,
    Deadline,
    due_micros,
    escalated,
    escalation_level,
    parse_duration,
    search_all,
)
from referral import green_channel, routing, workflow

__all__ = ["ESCALATION", "FLAG_SYSTEM", "Deadline", "configured", "parse_duration", "set_response_deadline", "sweep"]

BASE = "http://county-alliance.org/fhir"
CANCEL_REASON_SYSTEM = f"{BASE}/CodeSystem/referral-cancel-reason"
DEFAULTS = {"green-channel": "PT10M", "stat": "PT2H", "asap": "PT2H", "urgent": "PT2H", "routine": "P2WD"}
OPEN = ("requested", "received")


def configured() -> dict[str, Deadline]:
    overrides = json.loads(os.environ.get("ALLIANCE_REFERRAL_DEADLINES", "{}") or "{}")
    return {key: parse_duration(value) for key, value in {**DEFAULTS, **overrides}.items()}


def deadline_for(request: dict[str, Any], table: dict[str, Deadline] | None = None) -> Deadline:
    table = table or configured()
    if green_channel.pathway(request) is not None:
        return table["green-channel"]
    priority = request.get("priority") or "routine"
    category = routing.referral_direction(request) or ""
    return table.get(f"{category}/{priority}") or table.get(priority) or table["routine"]


def set_response_deadline(task: dict[str, Any], request: dict[str, Any], now_micros: int) -> None:
    """`restriction.period.end` from configuration; a client's earlier deadline is kept."""
    due = deadline_for(request).after(from_micros(now_micros))
    given = ((task.get("restriction") or {}).get("period") or {}).get("end")
    bounds = date_range(given) if isinstance(given, str) else None
    if bounds and bounds[0] <= to_micros(due):
        return
    task.setdefault("restriction", {}).setdefault("period", {})["end"] = format_instant(to_micros(due))


@dataclass
class SweepReport:
    escalated: int = 0
    expired: int = 0
    examined: int = 0


async def sweep(repo: Any, now_micros: int, *, table: dict[str, Deadline] | None = None) -> SweepReport:
    """Escalate and expire overdue referral Tasks as of `now_micros`. The repo acts as the system."""
    table = table or configured()
    report = SweepReport()
    for stored in await _open_tasks(repo):
        report.examined += 1
        task = stored.parsed()
        due = due_micros(task)
        if due is None or now_micros <= due:
            continue
        request = await _request(repo, task)
        length = to_micros(deadline_for(request, table).after(from_micros(due))) - due
        overdue_for = now_micros - due
        if request.get("priority", "routine") == "routine" and overdue_for > 2 * length:
            await _expire(repo, task, stored.version_id, now_micros)
            report.expired += 1
            continue
        level = 1 if overdue_for <= length else 2
        if level > escalation_level(task):
            await _escalate(repo, task, level, due, now_micros)
            report.escalated += 1
    return report


async def _open_tasks(repo: Any) -> list[Any]:
    return await search_all(repo, "Task", [("code", f"{workflow.TASK_CODE_SYSTEM}|referral"), ("status", ",".join(OPEN))])


async def _request(repo: Any, task: dict[str, Any]) -> dict[str, Any]:
    focus = (workflow.reference_of(task.get("focus")) or "").split("/", 1)[-1]
    return (await repo.read("ServiceRequest", focus)).parsed()


async def _escalate(repo: Any, task: dict[str, Any], level: int, due: int, now_micros: int) -> None:
    target = await _escalation_target(repo, task)
    role = "referral-desk" if level == 1 else "county-hospital"
    await repo.update("Task", task["id"], escalated(task, level=level, target=target, role=role, due=due,
                                                    now_micros=now_micros))


async def _escalation_target(repo: Any, task: dict[str, Any]) -> str:
    party = workflow.reference_of(task.get("owner")) or workflow.reference_of(task.get("requester")) or ""
    if party.startswith("Organization/"):
        place = await routing.place(repo.config.references, party)
        if place.county:
            return place.county
    return party


async def _expire(repo: Any, task: dict[str, Any], version: int, now_micros: int) -> None:
    cancelled = {
        **task,
        "status": "cancelled",
        "statusReason": {"coding": [{"system": CANCEL_REASON_SYSTEM, "code": "expired", "display": "逾期自动取消"}],
                         "text": "No answer within the deadline; cancelled automatically"},
        "businessStatus": {"coding": [{"system": workflow.BUSINESS_STATUS_SYSTEM, "code": "cancelled-by-system"}]},
        "lastModified": format_instant(now_micros),
    }
    await repo.update("Task", task["id"], cancelled, if_match=version)


Clock = Callable[[], int]

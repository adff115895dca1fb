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
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from fhirkit.search.request import parse_search
from fhirkit.search.values import date_range, format_instant, from_micros, to_micros
from referral import green_channel, routing, workflow

BASE = "http://county-alliance.org/fhir"
ESCALATION = f"{BASE}/StructureDefinition/escalation"
FLAG_SYSTEM = f"{BASE}/CodeSystem/workflow-flag"
CANCEL_REASON_SYSTEM = f"{BASE}/CodeSystem/referral-cancel-reason"
DEFAULTS = {"green-channel": "PT10M", "stat": "PT2H", "asap": "PT2H", "urgent": "PT2H", "routine": "P2WD"}
OPEN = ("requested", "received")
_DURATION = re.compile(r"^P(?:(\d+)(WD|D))?(?:T(?:(\d+)H)?(?:(\d+)M)?)?$")


@dataclass(frozen=True)
class Deadline:
    days: int = 0
    working_days: int = 0
    seconds: int = 0

    def after(self, start: datetime) -> datetime:
        moment = start + timedelta(days=self.days, seconds=self.seconds)
        remaining = self.working_days
        while remaining > 0:
            moment += timedelta(days=1)
            if moment.weekday() < 5:
                remaining -= 1
        return moment


def parse_duration(text: str) -> Deadline:
    match = _DURATION.match(text.strip().upper())
    if not match or not any(match.groups()):
        raise ValueError(f"'{text}' is not a duration such as PT10M, PT2H, P2D or P2WD")
    amount, unit, hours, minutes = match.groups()
    seconds = int(hours or 0) * 3600 + int(minutes or 0) * 60
    if unit == "WD":
        return Deadline(working_days=int(amount), seconds=seconds)
    return Deadline(days=int(amount or 0), seconds=seconds)


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
        due = _due(task)
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
        if level > _escalation_level(task):
            await _escalate(repo, task, level, due, now_micros)
            report.escalated += 1
    return report


async def _open_tasks(repo: Any) -> list[Any]:
    found: list[Any] = []
    cursor: str | None = None
    while True:
        params = [("code", f"{workflow.TASK_CODE_SYSTEM}|referral"), ("status", ",".join(OPEN)), ("_count", "500")]
        request = parse_search("Task", params)
        request.total, request.cursor = "none", cursor
        page = await repo.search(request)
        found.extend(page.matches)
        if not page.next_cursor:
            return found
        cursor = page.next_cursor


def _due(task: dict[str, Any]) -> int | None:
    end = ((task.get("restriction") or {}).get("period") or {}).get("end")
    bounds = date_range(end) if isinstance(end, str) else None
    return bounds[1] if bounds else None


async def _request(repo: Any, task: dict[str, Any]) -> dict[str, Any]:
    focus = (workflow.reference_of(task.get("focus")) or "").split("/", 1)[-1]
    return (await repo.read("ServiceRequest", focus)).parsed()


def _escalation_level(task: dict[str, Any]) -> int:
    for extension in task.get("extension") or []:
        if extension.get("url") == ESCALATION:
            return max((p.get("valueInteger", 0) for p in extension.get("extension") or [] if p.get("url") == "level"),
                       default=0)
    return 0


async def _escalate(repo: Any, task: dict[str, Any], level: int, due: int, now_micros: int) -> None:
    target = await _escalation_target(repo, task)
    escalation = {"url": ESCALATION, "extension": [
        {"url": "level", "valueInteger": level},
        {"url": "escalatedTo", "valueReference": {"reference": target}},
        {"url": "role", "valueCode": "referral-desk" if level == 1 else "county-hospital"},
        {"url": "due", "valueDateTime": format_instant(due)},
        {"url": "at", "valueDateTime": format_instant(now_micros)},
    ]}
    updated = {**task, "extension": [e for e in task.get("extension") or [] if e.get("url") != ESCALATION] + [escalation]}
    meta = dict(task.get("meta") or {})
    tags = [t for t in meta.get("tag") or [] if t.get("system") != FLAG_SYSTEM]
    meta["tag"] = [*tags, {"system": FLAG_SYSTEM, "code": "overdue", "display": "逾期未响应"}]
    updated["meta"] = meta
    await repo.update("Task", task["id"], updated)


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

"""Response deadlines of workflow Tasks: durations from configuration, the due moment a Task
carries (`restriction.period.end`), and how an overdue Task is marked and escalated.

Each service decides which durations apply and whom to escalate to; the marking is the same
everywhere so that one search finds every overdue Task: the tag `…/CodeSystem/workflow-flag#overdue`
and the extension `…/StructureDefinition/escalation` (`level`, `escalatedTo`, `role`, `due`, `at`).
"""

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from fhirkit.search.request import parse_search
from fhirkit.search.values import date_range, format_instant, from_micros, to_micros

BASE = "http://county-alliance.org/fhir"
ESCALATION = f"{BASE}/StructureDefinition/escalation"
FLAG_SYSTEM = f"{BASE}/CodeSystem/workflow-flag"
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

    def length_micros(self, start_micros: int) -> int:
        return to_micros(self.after(from_micros(start_micros))) - start_micros


def parse_duration(text: str) -> Deadline:
    match = _DURATION.match(text.strip().upper())
    if not match or not any(match.groups()):
        raise ValueError(f"'{text}' is not a duration such as PT10M, PT2H, P2D or P2WD")
    amount, unit, hours, minutes = match.groups()
    seconds = int(hours or 0) * 3600 + int(minutes or 0) * 60
    if unit == "WD":
        return Deadline(working_days=int(amount), seconds=seconds)
    return Deadline(days=int(amount or 0), seconds=seconds)


def set_due(task: dict[str, Any], deadline: Deadline, now_micros: int) -> None:
    """`restriction.period.end` = now + deadline; a client's earlier deadline is kept."""
    due = to_micros(deadline.after(from_micros(now_micros)))
    given = due_micros(task)
    if given is not None and given <= due:
        return
    task.setdefault("restriction", {}).setdefault("period", {})["end"] = format_instant(due)


def due_micros(task: dict[str, Any]) -> int | None:
    """The end of the day/second the Task is due (None: no deadline)."""
    end = ((task.get("restriction") or {}).get("period") or {}).get("end")
    bounds = date_range(end) if isinstance(end, str) else None
    return bounds[1] if bounds else None


def escalation_level(task: dict[str, Any]) -> int:
    for extension in task.get("extension") or []:
        if extension.get("url") == ESCALATION:
            return max((p.get("valueInteger", 0) for p in extension.get("extension") or [] if p.get("url") == "level"),
                       default=0)
    return 0


def escalated(task: dict[str, Any], *, level: int, target: str, role: str, due: int, now_micros: int) -> dict[str, Any]:
    """The Task tagged overdue with its escalation (replacing an earlier level's)."""
    escalation = {"url": ESCALATION, "extension": [
        {"url": "level", "valueInteger": level},
        {"url": "escalatedTo", "valueReference": {"reference": target}},
        {"url": "role", "valueCode": role},
        {"url": "due", "valueDateTime": format_instant(due)},
        {"url": "at", "valueDateTime": format_instant(now_micros)},
    ]}
    updated = {**task, "extension": [e for e in task.get("extension") or [] if e.get("url") != ESCALATION] + [escalation]}
    meta = dict(task.get("meta") or {})
    tags = [t for t in meta.get("tag") or [] if t.get("system") != FLAG_SYSTEM]
    meta["tag"] = [*tags, {"system": FLAG_SYSTEM, "code": "overdue", "display": "逾期未响应"}]
    updated["meta"] = meta
    return updated


async def search_all(repo: Any, resource_type: str, params: list[tuple[str, str]], page_size: int = 500) -> list[Any]:
    """Every match of a search, page by page (the sweep and statistics read whole sets)."""
    found: list[Any] = []
    cursor: str | None = None
    while True:
        request = parse_search(resource_type, [*params, ("_count", str(page_size))])
        request.total, request.cursor = "none", cursor
        page = await repo.search(request)
        found.extend(page.matches)
        if not page.next_cursor:
            return found
        cursor = page.next_cursor

"""Deadlines of telemedicine requests (the report is due by then) and the sweep that escalates
overdue ones.

Configuration: `ALLIANCE_TELEMEDICINE_DEADLINES`, a JSON object of ISO 8601 durations keyed by
`<category>/<priority>` or `<category>` (`P2WD`: two working days), over the defaults below
(remote imaging/ECG 30 minutes; an urgent teleconsultation 24 hours). A Task that starts waiting
gets `restriction.period.end`; a client's earlier deadline is kept. The sweep runs with an
explicit `now`: an open Task past its deadline is tagged overdue and escalated to the county
hospital above the invited party (level 1), after another deadline's length to the county
hospital of the inviting party, the alliance's operations (level 2). Nothing is cancelled
automatically: a late medical opinion is still wanted.
"""

import json
import os
from dataclasses import dataclass
from typing import Any

from fhirkit.workflow.deadlines import (
    Deadline,
    due_micros,
    escalated,
    escalation_level,
    parse_duration,
    search_all,
)
from fhirkit.workflow.machine import reference_of
from servicekit.tiers import place
from telemedicine.vocabulary import TASK_CODE_SYSTEM, TASK_CODES, category_of

DEFAULTS = {
    "remote-imaging": "PT30M",
    "remote-ecg": "PT30M",
    "remote-pathology": "P2WD",
    "teleconsultation": "P2WD",
    "teleconsultation/urgent": "PT24H",
    "teleconsultation/asap": "PT24H",
    "teleconsultation/stat": "PT24H",
}
OPEN = ("requested", "received", "accepted", "in-progress", "on-hold")


def configured() -> dict[str, Deadline]:
    """The table; a malformed setting fails at start-up (see fhir.py), not on a request."""
    overrides = json.loads(os.environ.get("ALLIANCE_TELEMEDICINE_DEADLINES", "{}") or "{}")
    if not isinstance(overrides, dict):
        raise ValueError("ALLIANCE_TELEMEDICINE_DEADLINES is a JSON object of durations")
    return {key: parse_duration(value) for key, value in {**DEFAULTS, **overrides}.items()}


def deadline_for(request: dict[str, Any], table: dict[str, Deadline] | None = None) -> Deadline:
    table = table or configured()
    category = category_of(request) or "teleconsultation"
    priority = request.get("priority") or "routine"
    return table.get(f"{category}/{priority}") or table.get(category) or table["teleconsultation"]


@dataclass
class SweepReport:
    escalated: int = 0
    examined: int = 0


async def sweep(repo: Any, now_micros: int, *, table: dict[str, Deadline] | None = None) -> SweepReport:
    """Escalate the open telemedicine Tasks overdue at `now_micros`. The repo acts as the system."""
    table = table or configured()
    report = SweepReport()
    codes = ",".join(f"{TASK_CODE_SYSTEM}|{code}" for code in sorted(TASK_CODES))
    for stored in await search_all(repo, "Task", [("code", codes), ("status", ",".join(OPEN))]):
        report.examined += 1
        task = stored.parsed()
        due = due_micros(task)
        if due is None or now_micros <= due:
            continue
        request = (await repo.read("ServiceRequest", (reference_of(task.get("focus")) or "").split("/", 1)[-1])).parsed()
        length = deadline_for(request, table).length_micros(due)
        level = 1 if now_micros - due <= length else 2
        if level > escalation_level(task):
            target, role = await _escalation_target(repo, task, level)
            await repo.update("Task", task["id"], escalated(task, level=level, target=target, role=role, due=due,
                                                            now_micros=now_micros))
            report.escalated += 1
    return report


async def _escalation_target(repo: Any, task: dict[str, Any], level: int) -> tuple[str, str]:
    party = reference_of(task.get("owner") if level == 1 else task.get("requester")) or ""
    role = "invited-party-management" if level == 1 else "alliance-operations"
    if party.startswith("Organization/"):
        where = await place(repo.config.references, party)
        return where.county or party, role
    return party, role

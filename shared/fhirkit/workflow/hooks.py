"""The Task hook that enforces a workflow and records who moved it (a Provenance per transition)."""

from collections.abc import Callable
from typing import Any

from fhirkit.search.values import format_instant
from fhirkit.store.hooks import WriteContext
from fhirkit.workflow.machine import TaskRules

ACTIVITY_SYSTEM = "http://county-alliance.org/fhir/CodeSystem/task-transition"
PROVENANCE_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"


class WorkflowTaskHooks:
    """Applies `rules` to Tasks that `applies_to` selects; other Tasks are stored as they are."""

    def __init__(self, rules: TaskRules, applies_to: Callable[[dict[str, Any]], bool]) -> None:
        self.rules = rules
        self.applies_to = applies_to

    async def before_write(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        task = resource if resource is not None else context.previous
        if task is None or not self.applies_to(task):
            return
        if resource is None:
            return  # deletion of workflow Tasks is refused by the service's own rules, if it wants to
        await self.rules.check(repo, resource, context.previous, if_match_given=context.if_match is not None)

    async def after_write(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        previous = context.previous
        if resource is None or previous is None or not self.applies_to(resource):
            return
        old, new = previous.get("status"), resource.get("status")
        if old == new:
            return
        moves = self.rules.machine.between(str(old), str(new), new)
        operation = moves[0].operation if moves else str(new)
        version = int((previous.get("meta") or {}).get("versionId", "0")) + 1
        await repo.create(provenance(resource, version, operation, repo.caller, repo.config.clock()))


def provenance(task: dict[str, Any], version: int, operation: str, caller: Any, now_micros: int) -> dict[str, Any]:
    organization = getattr(caller, "organization", None)
    # The platform itself (the deadline scheduler) is no directory organization: it is named, not referenced.
    acting_system = "system" in getattr(caller, "roles", ()) or not organization
    agent: dict[str, Any] = {
        "type": {"coding": [{"system": PROVENANCE_PARTICIPANT, "code": "performer"}]},
        "who": {"display": "alliance platform (system)"} if acting_system else {"reference": organization},
    }
    client = getattr(caller, "client_id", None)
    if client and not acting_system:
        agent["who"]["display"] = f"client {client}"
    target = [{"reference": f"Task/{task['id']}/_history/{version}"}]
    focus = (task.get("focus") or {}).get("reference")
    if isinstance(focus, str):
        target.append({"reference": focus})
    record: dict[str, Any] = {
        "resourceType": "Provenance",
        "target": target,
        "recorded": format_instant(now_micros),
        "activity": {"coding": [{"system": ACTIVITY_SYSTEM, "code": operation}], "text": f"${operation}"},
        "agent": [agent],
    }
    reason = task.get("statusReason")
    if reason:
        record["reason"] = [reason]
    return record

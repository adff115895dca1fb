"""The Task hook that enforces a workflow and records who moved it (a Provenance per transition)."""

from typing import Any

from fhirkit.search.values import format_instant
from fhirkit.store.hooks import WriteContext
from fhirkit.workflow.machine import Workflow

ACTIVITY_SYSTEM = "http://county-alliance.org/fhir/CodeSystem/task-transition"
PROVENANCE_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"


class WorkflowTaskHooks:
    """Holds each Task to the workflow that governs it; Tasks of no workflow are stored as they are."""

    def __init__(self, workflows: list[Workflow]) -> None:
        self.workflows = workflows

    def governing(self, task: dict[str, Any] | None) -> Workflow | None:
        if task is None:
            return None
        return next((w for w in self.workflows if w.applies_to(task)), None)

    async def before_write(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        workflow = self.governing(resource)
        if workflow is None:
            return  # not a workflow Task, or a deletion (the service's own rules decide those)
        await workflow.rules.check(repo, resource, context.previous, if_match_given=context.if_match is not None)

    async def after_write(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        previous = context.previous
        workflow = self.governing(resource)
        if resource is None or previous is None or workflow is None:
            return
        old, new = previous.get("status"), resource.get("status")
        if old == new:
            return
        moves = workflow.rules.machine.between(str(old), str(new), new)
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

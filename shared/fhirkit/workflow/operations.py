"""The Task operations of a workflow: `$accept`, `$reject`, … and `$available-actions`.

Each operation reads the Task, builds the next version (status, reason, business status,
outputs, timestamps) and writes it with the client's `If-Match` through the ordinary update
path, so the Task hook checks it exactly as it checks a plain PUT.
"""

import copy
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from fhirkit.api import responses
from fhirkit.api.interactions import Result, parse_if_match
from fhirkit.api.router import Operation, OperationCall
from fhirkit.errors import BusinessRuleViolation, InvalidRequest
from fhirkit.search.values import format_instant
from fhirkit.workflow.machine import (
    HOLD_EXTENSION,
    RESUME_TARGET,
    PreconditionRequired,
    Transition,
    Workflow,
    status_before_hold,
)

WORKFLOW_BASE = "http://county-alliance.org/fhir"


def transition_operations(workflows: list[Workflow]) -> list[Operation]:
    """One `$operation` per transition name across the workflows a service runs; each Task is
    handled by the workflow that governs it."""
    names = list(dict.fromkeys(t.operation for w in workflows for t in w.rules.machine.transitions))
    operations = [
        Operation(name, _handler(workflows, name), ("Task",), instance=True,
                  definition=f"{WORKFLOW_BASE}/OperationDefinition/Task-{name}")
        for name in names
    ]
    operations.append(
        Operation("available-actions", _available_actions(workflows), ("Task",), instance=True, methods=("GET",),
                  writes=False, definition=f"{WORKFLOW_BASE}/OperationDefinition/Task-available-actions")
    )
    return operations


def governing(workflows: list[Workflow], task: dict[str, Any]) -> Workflow:
    for workflow in workflows:
        if workflow.applies_to(task):
            return workflow
    raise BusinessRuleViolation(f"Task/{task.get('id')} follows no workflow of this service", expression=["Task.code"])


def require_if_match(call: OperationCall) -> int:
    version = parse_if_match(call.request.headers.get("if-match"))
    if version is None:
        raise PreconditionRequired(f"${call.request.url.path.rsplit('$', 1)[-1]} needs If-Match with the Task's version")
    return version


def _handler(workflows: list[Workflow], name: str) -> Callable[[OperationCall], Awaitable[Result]]:
    async def handler(call: OperationCall) -> Result:
        version = require_if_match(call)
        stored = await call.repo.read("Task", call.resource_id or "")
        task = stored.parsed()
        rules = governing(workflows, task).rules
        named = [t for t in rules.machine.transitions if t.operation == name]
        if not named:
            raise BusinessRuleViolation(
                f"A {rules.machine.name} Task has no ${name}. Allowed from '{task.get('status')}': "
                f"{rules.machine.describe_moves(str(task.get('status')))}"
            )
        candidates = [t for t in named if task.get("status") in t.sources]
        chosen = candidates[0] if candidates else named[0]  # the Task hook refuses it, listing the moves
        now = format_instant(call.repo.config.clock())
        updated = next_version(task, chosen, call, now=now, business_status_system=rules.machine.business_status_system)
        outcome = await call.repo.update("Task", task["id"], updated, if_match=version)
        headers = responses.resource_headers(outcome.stored, call.options.base)
        return Result(200, outcome.stored.content, headers, outcome.stored)

    return handler


def next_version(
    task: dict[str, Any], transition: Transition, call: OperationCall, *, now: str, business_status_system: str
) -> dict[str, Any]:
    """The Task after `transition`, with what the caller sent (reason, outputs, note)."""
    new = copy.deepcopy(task)
    old_status = task.get("status")
    target = status_before_hold(task) if transition.target == RESUME_TARGET else transition.target
    new["status"] = target or old_status
    _set_hold_marker(new, transition, old_status)
    reason = call.parameter("reason")
    if reason is not None:
        new["statusReason"] = reason if isinstance(reason, dict) else {"text": str(reason)}
    elif not transition.requires_reason:
        new.pop("statusReason", None)  # the reason of an earlier hold or rejection no longer applies
    if transition.business_status:
        new["businessStatus"] = {"coding": [{"system": business_status_system, "code": transition.business_status}]}
    for output in _parameters(call, "output"):
        new.setdefault("output", []).append({"type": {"text": "outcome"}, "valueReference": output})
    note = call.parameter("note")
    if isinstance(note, str) and note:
        new.setdefault("note", []).append({"text": note, "time": now})
    new["lastModified"] = now
    if new["status"] == "in-progress":
        new.setdefault("executionPeriod", {})["start"] = now
    if new["status"] in ("completed", "failed", "cancelled"):
        new.setdefault("executionPeriod", {})["end"] = now
    return new


def _set_hold_marker(task: dict[str, Any], transition: Transition, old_status: Any) -> None:
    extensions = [e for e in task.get("extension") or [] if e.get("url") != HOLD_EXTENSION]
    if transition.target == "on-hold":
        extensions.append({"url": HOLD_EXTENSION, "valueCode": old_status})
    if extensions:
        task["extension"] = extensions
    else:
        task.pop("extension", None)


def _parameters(call: OperationCall, name: str) -> list[Any]:
    body = call.body
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        return []
    values = []
    for part in body.get("parameter") or []:
        if part.get("name") == name:
            value = part.get("valueReference")
            if not isinstance(value, dict) or not isinstance(value.get("reference"), str):
                raise InvalidRequest(f"Parameter '{name}' must be a valueReference")
            values.append(value)
    return values


def _available_actions(workflows: list[Workflow]) -> Callable[[OperationCall], Awaitable[Result]]:
    async def handler(call: OperationCall) -> Result:
        stored = await call.repo.read("Task", call.resource_id or "")
        task = stored.parsed()
        rules = governing(workflows, task).rules
        roles = await rules.roles(call.repo, task, task)
        status = str(task.get("status"))
        parameters = []
        for transition in rules.machine.from_status(status):
            if transition.actors & roles:
                parts = [{"name": "operation", "valueCode": transition.operation},
                         {"name": "targetStatus", "valueCode": _target(transition, task)}]
                if transition.requires_reason:
                    parts.append({"name": "requires", "valueCode": "reason"})
                if transition.requires_output:
                    parts.append({"name": "requires", "valueCode": "output"})
                parameters.append({"name": "action", "part": parts})
        parameters.append({"name": "status", "valueCode": status})
        parameters.extend({"name": "role", "valueCode": role} for role in sorted(roles))
        body = {"resourceType": "Parameters", "parameter": parameters}
        return Result(200, orjson.dumps(body), {"ETag": stored.etag})

    return handler


def _target(transition: Transition, task: dict[str, Any]) -> str:
    if transition.target == RESUME_TARGET:
        return status_before_hold(task) or "received"
    return transition.target

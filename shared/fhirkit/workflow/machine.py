"""Task state machines (the FHIR workflow pattern), enforced on every write path.

A service describes its workflow as data: the Task statuses a new Task may start in and the
transitions between statuses, each with the roles that may make it and what must come with it.
`TaskRules.check` is called from the Task's `before_write` hook, so a plain PUT, a PATCH, a
transaction entry and the `$accept`-style operations are all held to the same table.
"""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fhirkit.errors import BusinessRuleViolation, FhirError, Forbidden

Roles = frozenset[str]


class PreconditionRequired(FhirError):
    """A state change without `If-Match`: two people acting on one Task must not overwrite each other."""

    status_code, issue_code = 428, "conflict"


@dataclass(frozen=True)
class Transition:
    operation: str  # the `$operation` name, e.g. "accept"
    sources: frozenset[str]  # Task.status values it starts from
    target: str  # Task.status after; RESUME_TARGET returns to the status before on-hold
    actors: frozenset[str]  # roles allowed to make it, e.g. {"owner"}
    requires_reason: bool = False  # Task.statusReason
    requires_output: bool = False  # Task.output (the outcome document)
    business_status: str | None = None
    description: str = ""


RESUME_TARGET = "*previous*"


def transition(operation: str, sources: set[str], target: str, actors: set[str], **options: Any) -> Transition:
    """A Transition written with plain sets, as the services' tables do."""
    return Transition(operation, frozenset(sources), target, frozenset(actors), **options)


@dataclass(frozen=True)
class StateMachine:
    name: str
    initial: frozenset[str]
    transitions: tuple[Transition, ...]
    business_status_system: str

    def from_status(self, status: str) -> list[Transition]:
        return [t for t in self.transitions if status in t.sources]

    def operation(self, name: str) -> Transition | None:
        return next((t for t in self.transitions if t.operation == name), None)

    def between(self, source: str, target: str, resumed_to: str | None) -> list[Transition]:
        found = []
        for transition in self.from_status(source):
            if transition.target == target or (transition.target == RESUME_TARGET and target == resumed_to):
                found.append(transition)
        return found

    def describe_moves(self, status: str) -> str:
        moves = self.from_status(status)
        if not moves:
            return f"'{status}' is final: no transition leaves it"
        return "; ".join(
            f"${t.operation} → {t.target if t.target != RESUME_TARGET else 'the status before on-hold'}"
            f" (by {', '.join(sorted(t.actors))})"
            for t in moves
        )


@dataclass
class TransitionCheck:
    """The outcome of checking one write: which transition it is (None: no status change)."""

    transition: Transition | None
    roles: Roles


RoleResolver = Callable[[Any, dict[str, Any], dict[str, Any] | None], Awaitable[Roles]]
Guard = Callable[[Any, Transition, dict[str, Any], dict[str, Any]], Awaitable[None]]


@dataclass
class TaskRules:
    machine: StateMachine
    roles: RoleResolver  # (repo, task, previous) → the caller's roles on this Task
    guards: dict[str, Guard] = field(default_factory=dict)  # per operation: extra checks (outcome exists, …)
    parties_may_edit: frozenset[str] = frozenset({"owner", "requester"})

    async def check(self, repo: Any, task: dict[str, Any], previous: dict[str, Any] | None,
                    *, if_match_given: bool) -> TransitionCheck:
        roles = await self.roles(repo, task, previous)
        if previous is None:
            return self._check_create(task, roles)
        old, new = previous.get("status"), task.get("status")
        if old == new:
            if not roles & self.parties_may_edit:
                raise Forbidden("Only the parties of this Task may change it")
            return TransitionCheck(None, roles)
        if not if_match_given:
            raise PreconditionRequired(
                f"Changing Task.status from '{old}' to '{new}' needs If-Match with the version you saw"
            )
        transition = self._transition(old, new, previous, roles)
        _require_content(transition, task)
        guard = self.guards.get(transition.operation)
        if guard is not None:
            await guard(repo, transition, task, previous)
        return TransitionCheck(transition, roles)

    def _check_create(self, task: dict[str, Any], roles: Roles) -> TransitionCheck:
        status = task.get("status")
        if status not in self.machine.initial:
            raise BusinessRuleViolation(
                f"A new {self.machine.name} Task starts as {' or '.join(sorted(self.machine.initial))}, "
                f"not '{status}'",
                expression=["Task.status"],
            )
        return TransitionCheck(None, roles)

    def _transition(self, old: Any, new: Any, previous: dict[str, Any], roles: Roles) -> Transition:
        candidates = self.machine.between(str(old), str(new), status_before_hold(previous))
        if not candidates:
            raise BusinessRuleViolation(
                f"A {self.machine.name} Task cannot go from '{old}' to '{new}'. "
                f"Allowed from '{old}': {self.machine.describe_moves(str(old))}",
                expression=["Task.status"],
            )
        for transition in candidates:
            if transition.actors & roles:
                return transition
        who = ", ".join(sorted(set().union(*(t.actors for t in candidates))))
        raise Forbidden(f"Only the {who} may move this Task from '{old}' to '{new}'")


def _require_content(transition: Transition, task: dict[str, Any]) -> None:
    if transition.requires_reason and not _has_reason(task):
        raise BusinessRuleViolation(
            f"${transition.operation} needs a reason (Task.statusReason)", expression=["Task.statusReason"]
        )
    if transition.requires_output and not task.get("output"):
        raise BusinessRuleViolation(
            f"${transition.operation} needs the outcome document in Task.output", expression=["Task.output"]
        )


def _has_reason(task: dict[str, Any]) -> bool:
    reason = task.get("statusReason") or {}
    return bool(reason.get("text") or reason.get("coding"))


def reference_of(value: Any) -> str | None:
    """The `reference` string of a Reference element (None when absent or not a string)."""
    reference = value.get("reference") if isinstance(value, dict) else None
    return reference if isinstance(reference, str) else None


HOLD_EXTENSION = "http://county-alliance.org/fhir/StructureDefinition/status-before-hold"


def status_before_hold(task: dict[str, Any]) -> str | None:
    for extension in task.get("extension") or []:
        if extension.get("url") == HOLD_EXTENSION:
            return extension.get("valueCode")
    return None


@dataclass(frozen=True)
class Workflow:
    """A state machine's rules and the Tasks they govern (selected by `Task.code`, typically)."""

    rules: TaskRules
    applies_to: Callable[[dict[str, Any]], bool]

"""Referral Tasks: the shared workflow engine plus what a referral Task must point at."""

from typing import Any

from fhirkit.errors import BusinessRuleViolation
from fhirkit.search.values import format_instant
from fhirkit.store.hooks import WriteContext
from fhirkit.workflow.hooks import WorkflowTaskHooks
from referral import deadlines, follow_up, green_channel, routing, workflow

IMMUTABLE = ("focus", "for", "requester", "code")
WORKFLOWS = [workflow.REFERRAL_WORKFLOW, follow_up.FOLLOW_UP_WORKFLOW]


class ReferralTaskHooks:
    def __init__(self) -> None:
        self.workflow = WorkflowTaskHooks(WORKFLOWS)

    async def before_write(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        if resource is not None and workflow.is_referral_task(resource):
            if context.previous is None:
                request = await _check_new_task(repo, resource)
            else:
                _check_immutable(resource, context.previous)
                request = await _focus(repo, resource)
        await self.workflow.before_write(repo, resource, context)
        if resource is not None and workflow.is_referral_task(resource):
            _record_times(repo, resource, context.previous, request)

    async def after_write(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        await self.workflow.after_write(repo, resource, context)
        if _accepted_now(resource, context.previous) and workflow.is_referral_task(resource or {}):
            request = await _focus(repo, resource or {})
            if routing.referral_direction(request) == "downward-referral":
                await follow_up.create_follow_ups(repo, resource or {}, request)


def _accepted_now(task: dict[str, Any] | None, previous: dict[str, Any] | None) -> bool:
    return bool(task and previous and task.get("status") == "accepted" and previous.get("status") != "accepted")


async def _focus(repo: Any, task: dict[str, Any]) -> dict[str, Any]:
    focus = workflow.reference_of(task.get("focus")) or ""
    if not focus.startswith("ServiceRequest/"):
        raise BusinessRuleViolation("A referral Task's focus is the referral ServiceRequest", expression=["Task.focus"])
    return (await repo.read("ServiceRequest", focus.split("/", 1)[1])).parsed()


def _record_times(repo: Any, task: dict[str, Any], previous: dict[str, Any] | None, request: dict[str, Any]) -> None:
    """The response deadline when the Task starts waiting, and the green-channel timeline."""
    now = repo.config.clock()
    status = task.get("status")
    if status == "requested" and (previous is None or previous.get("status") != "requested"):
        deadlines.set_response_deadline(task, request, now)
        task.setdefault("authoredOn", format_instant(now))
    if green_channel.pathway(request) is not None and (previous is None or previous.get("status") != status):
        green_channel.stamp(task, str(status), format_instant(now))


async def _check_new_task(repo: Any, task: dict[str, Any]) -> dict[str, Any]:
    focus = workflow.reference_of(task.get("focus")) or ""
    request = await _focus(repo, task)
    if routing.referral_direction(request) is None:
        raise BusinessRuleViolation(f"{focus} is not a referral (no referral category)", expression=["Task.focus"])
    if workflow.reference_of(task.get("for")) != workflow.reference_of(request.get("subject")):
        raise BusinessRuleViolation("Task.for must be the referral's subject", expression=["Task.for"])
    owner = workflow.reference_of(task.get("owner"))
    performers = {workflow.reference_of(p) for p in request.get("performer") or []}
    if owner and performers and owner not in performers:
        raise BusinessRuleViolation(f"Task.owner {owner} is not a performer of {focus}", expression=["Task.owner"])
    if not owner and green_channel.pathway(request) is not None and performers:
        task["owner"] = {"reference": min(p for p in performers if p)}  # the emergency center, at once
    return request


def _check_immutable(task: dict[str, Any], previous: dict[str, Any]) -> None:
    for field in IMMUTABLE:
        if task.get(field) != previous.get(field):
            raise BusinessRuleViolation(f"Task.{field} of a referral cannot change", expression=[f"Task.{field}"])

"""Telemedicine Tasks: the shared workflow engine plus what such a Task must point at, and its
deadline when it starts waiting."""

from typing import Any

from fhirkit.errors import BusinessRuleViolation
from fhirkit.search.values import format_instant
from fhirkit.store.hooks import WriteContext
from fhirkit.workflow.deadlines import set_due
from fhirkit.workflow.hooks import WorkflowTaskHooks
from fhirkit.workflow.machine import reference_of
from servicekit.tiers import organization_of
from telemedicine import deadlines, invitation, report, workflow
from telemedicine.vocabulary import TASK_CODE_OF_CATEGORY, category_of, is_telemedicine_task, task_code

IMMUTABLE = ("focus", "for", "requester", "code")


class TelemedicineTaskHooks:
    def __init__(self) -> None:
        self.workflow = WorkflowTaskHooks(workflow.WORKFLOWS)

    async def before_write(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        if resource is not None and is_telemedicine_task(resource):
            request = await report.focus_request(repo, resource)
            if context.previous is None:
                await _check_new_task(repo, resource, request)
            else:
                _check_immutable(resource, context.previous)
            if _starts_waiting(resource, context.previous):
                now = repo.config.clock()
                set_due(resource, deadlines.deadline_for(request), now)
                resource.setdefault("authoredOn", format_instant(now))
        await self.workflow.before_write(repo, resource, context)

    async def after_write(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        await self.workflow.after_write(repo, resource, context)


def _starts_waiting(task: dict[str, Any], previous: dict[str, Any] | None) -> bool:
    return task.get("status") == "requested" and (previous is None or previous.get("status") != "requested")


async def _check_new_task(repo: Any, task: dict[str, Any], request: dict[str, Any]) -> None:
    focus = reference_of(task.get("focus"))
    category = category_of(request)
    if category is None:
        raise BusinessRuleViolation(f"{focus} is not a telemedicine request", expression=["Task.focus"])
    if TASK_CODE_OF_CATEGORY[category] != task_code(task):
        raise BusinessRuleViolation(
            f"A {category} request is tracked by a Task with code '{TASK_CODE_OF_CATEGORY[category]}'",
            expression=["Task.code"],
        )
    if reference_of(task.get("for")) != reference_of(request.get("subject")):
        raise BusinessRuleViolation("Task.for must be the request's subject", expression=["Task.for"])
    if reference_of(task.get("requester")) != await _inviting_organization(repo, request):
        raise BusinessRuleViolation("Task.requester is the inviting Organization of the request",
                                    expression=["Task.requester"])
    owner = reference_of(task.get("owner"))
    if owner not in invitation.invited_organizations(request):
        raise BusinessRuleViolation(f"Task.owner must be the invited Organization (a performer of {focus})",
                                    expression=["Task.owner"])
    # The consent may have been revoked since the request was written.
    await invitation.check_consent(repo, request, repo.config.clock())


async def _inviting_organization(repo: Any, request: dict[str, Any]) -> str | None:
    requester = reference_of(request.get("requester")) or ""
    return await organization_of(repo.config.references, requester, "ServiceRequest.requester")


def _check_immutable(task: dict[str, Any], previous: dict[str, Any]) -> None:
    for field in IMMUTABLE:
        if task.get(field) != previous.get(field):
            raise BusinessRuleViolation(f"Task.{field} of a telemedicine Task cannot change",
                                        expression=[f"Task.{field}"])

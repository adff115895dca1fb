"""The `/fhir` interactions of a service as one ASGI app: a path split and a table look-up.

FastAPI's routing solved each endpoint's dependencies and walked the middleware stack for every
request, and the embedded gateway pays a service's routing on top of its own: on a read by id that
was half of the service's CPU. The interactions need none of it (their parameters are path
segments), so they are dispatched here; everything else a service serves (health, metrics) stays
with FastAPI.
"""

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from fhirkit import resources
from fhirkit.api import capabilities, interactions, responses
from fhirkit.api.handlers import response_for_error, safe_path
from fhirkit.api.interactions import Result
from fhirkit.api.router import (
    FhirService,
    InteractionCall,
    InteractionContext,
    base_url,
    bundle_interaction,
    conditional_criteria,
    form_parameters,
    without_format,
)
from fhirkit.errors import InvalidRequest, MethodNotAllowed, ResourceNotFound

Handler = Callable[..., Awaitable[Response]]


class FhirDispatch:
    """Serves `/fhir` and everything under it for one service."""

    def __init__(self, service: FhirService) -> None:
        self.service = service
        self.ctx = InteractionContext(service)
        # (number of path segments after /fhir, method) → handler(request, *segments)
        self.routes: dict[tuple[int, str], Handler] = {
            (0, "POST"): self.batch_or_transaction,
            (1, "GET"): self.type_level_get,
            (1, "POST"): self.type_level_post,
            (1, "PUT"): self.conditional_update,
            (1, "DELETE"): self.conditional_delete,
            (2, "GET"): self.instance_get,
            (2, "POST"): self.instance_post,
            (2, "PUT"): self.update,
            (2, "PATCH"): self.patch,
            (2, "DELETE"): self.delete,
            (3, "GET"): self.instance_operation,
            (3, "POST"): self.instance_operation,
            (4, "GET"): self.vread,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await serve(self.dispatch, scope, receive, send)

    async def dispatch(self, request: Request) -> Response:
        segments = _segments(route_path(request.scope))
        method = "GET" if request.method == "HEAD" else request.method
        handler = self.routes.get((len(segments), method))
        if handler is None:
            if any(count == len(segments) for count, _ in self.routes):
                raise MethodNotAllowed(f"{request.method} is not allowed on {_shape(segments)}")
            raise ResourceNotFound(f"No FHIR interaction at {_shape(segments)}")
        return await handler(request, *segments)

    async def batch_or_transaction(self, request: Request) -> Response:
        return await self.ctx.run(request, bundle_interaction, write=True)

    async def type_level_get(self, request: Request, first: str) -> Response:
        if first == "metadata":
            responses.check_request_format(request)
            return responses.fhir_response(capabilities.capability_statement(self.service, base_url(request)))
        if first == "_history":
            return await self.ctx.run(request, lambda c: interactions.history(
                c.repo, None, None, c.params, c.options, self_path="_history"), only_reads=True)
        if first.startswith("$"):
            return await self.ctx.operation(request, first[1:], "system", None, None)
        await self.ctx.require_type(request, first)
        return await self.ctx.run(request, lambda c: interactions.search_type(
            c.repo, first, c.params, c.options, self_path=first), only_reads=True)

    async def type_level_post(self, request: Request, resource_type: str) -> Response:
        if resource_type.startswith("$"):
            return await self.ctx.operation(request, resource_type[1:], "system", None, None)
        await self.ctx.require_type(request, resource_type)
        # fhirpy sends conditional create as `POST Type?criteria` instead of If-None-Exist; a query
        # string of format parameters only (`?_format=json`) is a plain create.
        criteria = request.headers.get("if-none-exist") or without_format(request.url.query) or None
        return await self.ctx.run(request, lambda c: interactions.create(
            c.repo, resource_type, c.body(), c.options, if_none_exist=criteria), write=True)

    async def conditional_update(self, request: Request, resource_type: str) -> Response:
        await self.ctx.require_type(request, resource_type)
        criteria = conditional_criteria(request)
        return await self.ctx.run(request, lambda c: interactions.conditional_update(
            c.repo, resource_type, criteria, c.body(), c.options, if_match=c.if_match()), write=True)

    async def conditional_delete(self, request: Request, resource_type: str) -> Response:
        await self.ctx.require_type(request, resource_type)
        criteria = conditional_criteria(request)
        return await self.ctx.run(request, lambda c: interactions.conditional_delete(
            c.repo, resource_type, criteria, c.options), write=True)

    async def instance_get(self, request: Request, resource_type: str, resource_id: str) -> Response:
        await self.ctx.require_type(request, resource_type)
        if resource_id.startswith("$"):
            return await self.ctx.operation(request, resource_id[1:], "type", resource_type, None)
        if resource_id == "_history":
            return await self.ctx.run(request, lambda c: interactions.history(
                c.repo, resource_type, None, c.params, c.options, self_path=f"{resource_type}/_history"),
                only_reads=True)
        resources.check_id(resource_id)
        return await self.ctx.run(
            request, lambda c: interactions.read(c.repo, resource_type, resource_id, c.options), only_reads=True)

    async def instance_post(self, request: Request, resource_type: str, second: str) -> Response:
        await self.ctx.require_type(request, resource_type)
        if second == "_search":
            return await self.ctx.run(request, lambda c: _search_form(c, resource_type), only_reads=True)
        if not second.startswith("$"):
            raise MethodNotAllowed(f"POST to {resource_type}/{second[:64]} is not an interaction; use PUT to update")
        return await self.ctx.operation(request, second[1:], "type", resource_type, None)

    async def update(self, request: Request, resource_type: str, resource_id: str) -> Response:
        await self.ctx.require_type(request, resource_type)
        resources.check_id(resource_id)
        return await self.ctx.run(request, lambda c: interactions.update(
            c.repo, resource_type, resource_id, c.body(), c.options, if_match=c.if_match()), write=True)

    async def patch(self, request: Request, resource_type: str, resource_id: str) -> Response:
        await self.ctx.require_type(request, resource_type)
        resources.check_id(resource_id)
        content_type = request.headers.get("content-type", "")
        return await self.ctx.run(request, lambda c: interactions.patch_instance(
            c.repo, resource_type, resource_id, c.body(), content_type, c.options, if_match=c.if_match()), write=True)

    async def delete(self, request: Request, resource_type: str, resource_id: str) -> Response:
        await self.ctx.require_type(request, resource_type)
        resources.check_id(resource_id)
        return await self.ctx.run(request, lambda c: interactions.delete(
            c.repo, resource_type, resource_id, c.options, if_match=c.if_match()), write=True)

    async def instance_operation(self, request: Request, resource_type: str, resource_id: str, operation: str) -> Response:
        await self.ctx.require_type(request, resource_type)
        resources.check_id(resource_id)
        if operation == "_history" and request.method in ("GET", "HEAD"):
            return await self.ctx.run(request, lambda c: interactions.history(
                c.repo, resource_type, resource_id, c.params, c.options,
                self_path=f"{resource_type}/{resource_id}/_history"), only_reads=True)
        if not operation.startswith("$"):
            raise InvalidRequest(f"'{operation[:64]}' is not an operation (operations start with $)")
        return await self.ctx.operation(request, operation[1:], "instance", resource_type, resource_id)

    async def vread(self, request: Request, resource_type: str, resource_id: str, history: str, version_id: str) -> Response:
        if history != "_history":
            raise ResourceNotFound(f"No FHIR interaction at {_shape([resource_type, resource_id, history, version_id])}")
        await self.ctx.require_type(request, resource_type)
        resources.check_id(resource_id)
        return await self.ctx.run(request, lambda c: interactions.vread(
            c.repo, resource_type, resource_id, version_id, c.options), only_reads=True)


async def _search_form(call: InteractionCall, resource_type: str) -> Result:
    params = [*call.params, *form_parameters(call.raw, call.request.headers.get("content-type", ""))]
    return await interactions.search_type(call.repo, resource_type, params, call.options, self_path=resource_type)


async def serve(handler: Callable[[Request], Awaitable[Response]], scope: Scope, receive: Receive, send: Send) -> None:
    """Answers one request with `handler`; every failure leaves as an OperationOutcome."""
    request = Request(scope, receive)
    try:
        response = await handler(request)
    except Exception as exc:
        response = response_for_error(request, exc)
    await response(scope, receive, send)


def route_path(scope: Scope) -> str:
    """The path below the app's mount point (an app mounted at `/internal/platform` sees
    `/fhir/...`), as Starlette's routing reads it."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def is_fhir_path(path: str) -> bool:
    return path == "/fhir" or path.startswith("/fhir/")


def _segments(path: str) -> list[str]:
    return [segment for segment in path[len("/fhir"):].split("/") if segment]


def _shape(segments: list[str]) -> str:
    """The path for an error message, ids left out (messages may be logged)."""
    return safe_path("/fhir/" + "/".join(segments[:4]))


"""What every service's FHIR interactions share; services configure it, never copy it.

A service describes itself with a `FhirService` (its store, database, operations and how a
caller is authenticated); `fhirkit.api.dispatch` serves `/fhir/...` for every interaction of the
spec with the context here (the caller, the request's one transaction, the repository).
"""

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.responses import Response

from fhirkit import resources
from fhirkit.api import bundles, compensation, interactions, responses
from fhirkit.api.interactions import RequestOptions, Result
from fhirkit.errors import (
    InvalidRequest,
    MethodNotAllowed,
    NotSupported,
    PayloadTooLarge,
    UnknownResourceType,
    UnsupportedMediaType,
)
from fhirkit.search.request import refuse_nul
from fhirkit.store.repository import Repository, StoreConfig

MAX_BODY_BYTES = 16 * 1024 * 1024


class Database(Protocol):
    def transaction(self, *, write: bool) -> AbstractAsyncContextManager[AsyncConnection]: ...

    def statement(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A connection for one reading statement, outside any transaction."""
        ...

    def reads_then_writes(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A connection whose reads may run outside a transaction; `writing(conn)` wraps its writes."""
        ...

    def writing(self, conn: AsyncConnection) -> AbstractAsyncContextManager[None]:
        """A transaction for the writes on a `reads_then_writes` connection (nothing more inside one)."""
        ...


class Caller(Protocol):
    organization: str


@dataclass
class OperationCall:
    repo: Repository
    request: Request
    options: RequestOptions
    caller: Any
    resource_type: str | None
    resource_id: str | None
    body: Any
    params: list[tuple[str, str]]
    # Wraps what the operation writes: a transaction of its own when its reads ran outside one
    # (`Operation.records_on_get`), nothing more when the whole call is a transaction already.
    writing: Callable[[], AbstractAsyncContextManager[Any]] = nullcontext

    def parameter(self, name: str) -> Any:
        """A named input from a Parameters body or the query string (first match)."""
        if isinstance(self.body, dict) and self.body.get("resourceType") == "Parameters":
            for part in self.body.get("parameter") or []:
                if part.get("name") == name:
                    return _parameter_value(part)
        for key, value in self.params:
            if key == name:
                return value
        return None


def require_operation_body(op: "Operation", body: Any) -> None:
    """An operation's body is Parameters (or the resource it takes): another body would be
    ignored without a word, and a malformed one would fail inside the operation."""
    if body is None:
        return
    kind = body.get("resourceType") if isinstance(body, dict) else None
    if kind == "Parameters":
        require_parameter_shape(body.get("parameter"), "Parameters.parameter")
    elif not (op.takes_resource and isinstance(kind, str)):
        raise InvalidRequest(f"${op.name} takes a Parameters body" + (" or a resource" if op.takes_resource else "")
                             + (f", not {kind[:64]}" if isinstance(kind, str) else ""))


def require_parameter_shape(parts: Any, path: str) -> None:
    """A Parameters body's `parameter` (and each `part`) is a list of objects with a name: anything
    else is the client's error (400), not a crash in the operation that reads it."""
    if parts is None:
        return
    if not isinstance(parts, list):
        raise InvalidRequest(f"{path} must be an array of parameters", expression=[path])
    for index, part in enumerate(parts):
        where = f"{path}[{index}]"
        if not isinstance(part, dict) or not isinstance(part.get("name"), str):
            raise InvalidRequest(f"{where} must be an object with a name", expression=[where])
        require_parameter_shape(part.get("part"), f"{where}.part")


def _parameter_value(part: dict[str, Any]) -> Any:
    for key, value in part.items():
        if key.startswith("value") or key == "resource":
            return value
    return part.get("part")


@dataclass(frozen=True)
class Operation:
    name: str  # without the `$`
    handler: Callable[[OperationCall], Awaitable[Result]]
    resource_types: tuple[str, ...] = ()  # empty: a system-level operation
    instance: bool = False
    type_level: bool = False
    system: bool = False
    methods: tuple[str, ...] = ("POST",)
    writes: bool = True
    definition: str | None = None  # canonical URL of its OperationDefinition
    # A GET that may record something besides answering (a recognition check grants access to
    # what it returned): its reads run outside a transaction and what it records inside
    # `OperationCall.writing()` (`Database.reads_then_writes`); a POST is one write transaction.
    records_on_get: bool = False
    # The body may be a resource ($validate's, $book's Appointment), not only Parameters.
    takes_resource: bool = False


@dataclass
class FhirService:
    name: str
    store: StoreConfig
    database: Database
    authenticate: Callable[[Request], Awaitable[Any]]
    operations: list[Operation] = field(default_factory=list)
    title: str = "County medical alliance FHIR service"

    def __post_init__(self) -> None:
        # Operations every FHIR server offers on every type it holds come with the engine;
        # a service's own definition of the same name wins.
        own = {op.name for op in self.operations}
        self.operations = [*self.operations, *(op for op in _standard_operations(self.store) if op.name not in own)]

    def operation(self, name: str, level: str, resource_type: str | None) -> Operation:
        for op in self.operations:
            if op.name != name:
                continue
            if level == "system" and op.system:
                return op
            at_level = (level == "type" and op.type_level) or (level == "instance" and op.instance)
            if at_level and resource_type in op.resource_types:
                return op
        raise NotSupported(f"Operation ${name[:64]} is not supported at {level} level" + (
            f" on {resource_type}" if resource_type else ""
        ))


async def _validate(call: OperationCall) -> Result:
    assert call.resource_type is not None
    return await interactions.validate_resource(call.repo, call.resource_type, call.body)


def _standard_operations(store: StoreConfig) -> list[Operation]:
    validate = Operation(
        name="validate",
        handler=_validate,
        resource_types=tuple(sorted(store.resource_types)),
        instance=True,
        type_level=True,
        writes=False,
        takes_resource=True,
        definition="http://hl7.org/fhir/OperationDefinition/Resource-validate",
    )
    return [validate]


async def bundle_interaction(call: "InteractionCall") -> Result:
    if compensation.requested_step(call.request) is not None:  # the gateway's transaction spanning services
        return await compensation.run_step(call)
    bundle = resources.require_resource(call.body(), "Bundle")
    kind = bundle.get("type")
    processor = bundles.BundleProcessor(call.repo, call.options, call.repo.conn.begin_nested)
    if kind == "transaction":
        return Result(200, await processor.transaction(bundle))
    if kind == "batch":
        return Result(200, await processor.batch(bundle))
    raise InvalidRequest(f"POST to the base takes a batch or transaction Bundle, not type '{str(kind)[:30]}'")


class InteractionCall:
    def __init__(self, repo: Repository, request: Request, raw: bytes, caller: Any) -> None:
        self.repo = repo
        self.request = request
        self.raw = raw
        self.caller = caller
        self.params = _query(request)
        self.options = _options(request)
        self._body: Any = None

    def body(self) -> Any:
        if self._body is None:
            content_type = self.request.headers.get("content-type", "")
            if content_type and "json" not in content_type:
                raise UnsupportedMediaType(
                    f"Content-Type '{content_type[:60]}' is not supported; send application/fhir+json"
                )
            handed = self.request.scope.get("extensions", {}).get(interactions.PARSED_BODY)
            self._body = interactions.load_body(self.raw, handed)
        return self._body

    def if_match(self) -> int | None:
        return interactions.parse_if_match(self.request.headers.get("if-match"))


class InteractionContext:
    def __init__(self, service: FhirService) -> None:
        self.service = service

    async def require_type(self, request: Request, resource_type: str) -> None:
        # Authenticate first: which types a service holds is not for anonymous callers to probe.
        await self.caller(request)
        if resource_type not in self.service.store.resource_types:
            raise UnknownResourceType(f"Resource type '{resource_type[:64]}' is not supported by this server")

    async def caller(self, request: Request) -> Any:
        if not hasattr(request.state, "fhir_caller"):
            request.state.fhir_caller = await self.service.authenticate(request)
        return request.state.fhir_caller

    async def run(
        self, request: Request, action: Callable[[InteractionCall], Awaitable[Result]], *, write: bool = False,
        only_reads: bool = False, records: bool = False,
    ) -> Response:
        """`only_reads`: the action writes nothing, so it runs without a transaction
        (`Database.statement`). `records`: it writes only now and then, inside
        `Database.writing` (`Database.reads_then_writes`)."""
        responses.check_request_format(request)
        caller = await self.caller(request)
        raw = await read_body(request) if write or request.method in ("POST", "PUT", "PATCH") else b""
        database = self.service.database
        if records and not write:
            connection = database.reads_then_writes()
        elif only_reads and not write:
            connection = database.statement()
        else:
            connection = database.transaction(write=write)
        async with connection as conn:
            repo = self._repository(conn, caller)
            result = await action(InteractionCall(repo, request, raw, caller))
        return responses.fhir_response(result.body, result.status, result.headers)

    async def operation(
        self, request: Request, name: str, level: str, resource_type: str | None, resource_id: str | None
    ) -> Response:
        caller = await self.caller(request)
        try:
            op = self.service.operation(name, level, resource_type)
        except NotSupported:
            if resource_id is not None:
                # An instance this service does not hold (or the caller may not see) is 404 first,
                # so that the gateway can ask the type's other owners.
                async with self.service.database.transaction(write=False) as conn:
                    await self._repository(conn, caller).read(resource_type or "", resource_id)
            raise
        if request.method not in op.methods:
            raise MethodNotAllowed(f"${name} does not accept {request.method}")

        async def invoke(call: InteractionCall) -> Result:
            body = call.body() if call.raw.strip() else None
            require_operation_body(op, body)
            op_call = OperationCall(call.repo, request, call.options, call.caller, resource_type, resource_id, body,
                                    call.params, writing=lambda: self.service.database.writing(call.repo.conn))
            return await op.handler(op_call)

        write = op.writes and request.method == "POST"
        return await self.run(request, invoke, write=write, records=op.writes and op.records_on_get)

    def _repository(self, conn: AsyncConnection, caller: Any) -> Repository:
        return Repository(conn, self.service.store, owner=getattr(caller, "organization", None), caller=caller)


async def read_body(request: Request) -> bytes:
    """The request body, refused with 413 as soon as it exceeds MAX_BODY_BYTES (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"The body exceeds {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise PayloadTooLarge(f"The body exceeds {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def form_parameters(raw: bytes, content_type: str) -> list[tuple[str, str]]:
    """Search parameters of a `POST Type/_search` body (application/x-www-form-urlencoded)."""
    if not raw.strip():
        return []
    if content_type.split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
        raise UnsupportedMediaType("POST _search takes its parameters as application/x-www-form-urlencoded")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("The search form is not valid UTF-8") from None
    return parse_qsl(text, keep_blank_values=True)


def _query(request: Request) -> list[tuple[str, str]]:
    # As Starlette's query_params would give them, without building its multi-dict.
    params = parse_qsl(responses.query_string(request), keep_blank_values=True)
    refuse_nul(params)  # operations read these too, not only searches
    return params


def conditional_criteria(request: Request) -> str:
    criteria = without_format(request.url.query)
    if not criteria:
        raise InvalidRequest("A conditional interaction needs search criteria in the query string")
    return criteria


def without_format(query: str) -> str:
    """The query string without `_format`/`_pretty`, which say how to answer, not what to match."""
    kept = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k not in ("_format", "_pretty")]
    return urlencode(kept)


def base_url(request: Request) -> str:
    forwarded = request.headers.get("x-forwarded-base")
    if forwarded:
        return forwarded.rstrip("/")
    return str(request.base_url).rstrip("/") + "/fhir"


def _options(request: Request) -> RequestOptions:
    prefer = _prefer(request.headers.get("prefer", ""))
    return RequestOptions(
        base=base_url(request),
        prefer_return=prefer.get("return", "representation"),
        lenient=prefer.get("handling") == "lenient",
    )


def _prefer(header: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in header.replace(";", ",").split(","):
        key, _, value = part.strip().partition("=")
        if key:
            out[key.strip().lower()] = value.strip().strip('"')
    if out.get("return") not in (None, "minimal", "representation", "OperationOutcome"):
        out.pop("return")
    return out

"""The gateway: one FHIR base URL in front of the services.

It authenticates the client (SMART Backend Services), checks the token's scopes against the
interaction, picks the owning service and forwards the request with the caller's identity in a
signed internal header. In the embedded mode every service runs in this process behind an
in-process ASGI transport; in distributed mode the same code reaches them over HTTP.
"""

import re
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
import orjson
from fastapi import FastAPI, Request
from starlette.responses import Response

from fhirkit import jsonio
from fhirkit.api.bundles import MAX_ENTRIES as MAX_BUNDLE_ENTRIES
from fhirkit.api.compensation import STEP_HEADER
from fhirkit.api.dispatch import route_path, serve
from fhirkit.api.handlers import install_exception_handlers
from fhirkit.api.responses import FHIR_JSON, check_request_format, query_string
from fhirkit.api.router import read_body
from fhirkit.errors import (
    FhirError,
    Forbidden,
    InvalidRequest,
    MethodNotAllowed,
    NotSupported,
    PayloadTooLarge,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from fhirkit.search.values import now_micros
from fhirkit.store.indexing import split_reference
from gateway import cross_transaction, foreign_includes, merged_search, routing
from gateway.audit import AccessNote, AuditTrail
from gateway.auth import Authenticated, AuthSettings, authenticate, build_auth_router
from gateway.auth.router import AUDITOR_ROLE, DISCOVERY_PATH
from gateway.break_glass import break_glass
from gateway.capabilities import merge_capabilities
from gateway.platform import DEFINITION as PLATFORM_DEFINITION
from gateway.rate_limit import RateLimiter
from gateway.upstream import Upstreams
from servicekit.app import FhirLaneApp, ServiceDefinition, create_service_app, startup_heap_frozen
from servicekit.identity import IDENTITY_HEADER, sign_identity
from servicekit.inprocess import call_asgi
from servicekit.observability import Metrics, RequestContextMiddleware, request_id_var
from servicekit.peers import SYSTEM_IDENTITY
from servicekit.settings import AllianceSettings

FORWARDED_REQUEST_HEADERS = ("content-type", "prefer", "if-match", "if-none-exist", "if-none-match", "if-modified-since")
FORWARDED_RESPONSE_HEADERS = ("etag", "location", "last-modified", "content-location", "www-authenticate", "retry-after")
# `$name` at the base → the owning service, and the type whose search scope the caller needs.
PLATFORM_INTERNAL_PATH = "/internal/platform"
# What a decoded path segment may be: a type, an id, a version, `_history`/`_search`, `$operation`.
# Anything else (`..`, an encoded `/` or `%`, NUL, spaces) would change meaning when the path is
# forwarded (the HTTP client resolves `..`; the service decodes `%` again), so it stops here.
PATH_SEGMENT = re.compile(r"[A-Za-z0-9_$.\-]+")
SYSTEM_OPERATIONS: dict[str, tuple[str, str]] = {
    "referral-statistics": ("referral", "Task"),
    "telemedicine-statistics": ("telemedicine", "Task"),
    "telemedicine-worklist": ("telemedicine", "Task"),
    "recognition-check": ("results-sharing", "Observation"),
    "recognition-statistics": ("results-sharing", "Task"),
}


def service_definitions() -> dict[str, ServiceDefinition]:
    from directory.fhir import DEFINITION as DIRECTORY
    from referral.fhir import DEFINITION as REFERRAL
    from results_sharing.fhir import DEFINITION as RESULTS_SHARING
    from telemedicine.fhir import DEFINITION as TELEMEDICINE

    return {
        "directory": DIRECTORY,
        "referral": REFERRAL,
        "results-sharing": RESULTS_SHARING,
        "telemedicine": TELEMEDICINE,
        "platform": PLATFORM_DEFINITION,
    }


@dataclass
class Upstream:
    status: int
    headers: dict[str, str]
    content: bytes


class Gateway:
    def __init__(
        self, settings: AllianceSettings, clients: dict[str, httpx.AsyncClient], local_apps: dict[str, Any] | None = None
    ) -> None:
        self.settings = settings
        self.clients = clients
        # Services in this process are called directly (servicekit.inprocess), the others over HTTP.
        self.local_apps = local_apps or {}
        remote = {name: settings.service_url(name) for name in clients if name not in self.local_apps}
        self.upstreams = Upstreams({name: url for name, url in remote.items() if url})
        self.secret = settings.secret("internal_secret")
        self._capabilities: bytes | None = None

    async def send(
        self,
        service: str,
        method: str,
        path: str,
        *,
        identity: Any,
        headers: dict[str, str] | None = None,
        content: bytes = b"",
        parsed: Any = None,
    ) -> Upstream:
        # Byte for byte as received: Starlette decodes header values as latin-1, and httpx would
        # refuse to encode a non-ASCII str (a UTF-8 `If-None-Exist`) as ASCII.
        outgoing: dict[str, str | bytes] = {k: v.encode("latin-1", "replace") for k, v in (headers or {}).items()}
        outgoing["x-request-id"] = request_id_var.get()
        outgoing["x-forwarded-base"] = self.settings.base_url
        if service in self.local_apps:
            status, answered, body = await call_asgi(
                self.local_apps[service], method, path, outgoing, content, host=service, parsed=parsed, caller=identity
            )
            return Upstream(status, {k: v for k, v in answered.items() if k in FORWARDED_RESPONSE_HEADERS}, body)
        outgoing[IDENTITY_HEADER] = sign_identity(identity, self.secret, request_id=request_id_var.get())
        if service in self.upstreams.urls:
            status, answered, body = await self.upstreams.request(service, method, path, outgoing, content)
            return Upstream(status, {k: v for k, v in answered.items() if k in FORWARDED_RESPONSE_HEADERS}, body)
        try:
            response = await self.clients[service].request(method, path, content=content, headers=outgoing)
        except httpx.TimeoutException:
            raise UpstreamTimeout(f"The {service} service did not answer in time") from None
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(f"The {service} service is unavailable ({type(exc).__name__})") from None
        kept = {k: v for k, v in response.headers.items() if k.lower() in FORWARDED_RESPONSE_HEADERS}
        return Upstream(response.status_code, kept, response.content)

    async def patient_custodians(self, patient: str) -> list[str]:
        """The organizations keeping a patient's record: Patient.managingOrganization, else the
        assigners of its medical record numbers."""
        upstream = await self.send("directory", "GET", f"/fhir/{patient}", identity=SYSTEM_IDENTITY)
        if upstream.status != 200:
            return []
        content = orjson.loads(upstream.content)
        managing = content.get("managingOrganization")
        holders = [managing] if managing else [i.get("assigner") for i in content.get("identifier") or []
                                               if isinstance(i, dict)]
        references = [h.get("reference") for h in holders if isinstance(h, dict)]
        return sorted({r for r in references if isinstance(r, str) and r.startswith("Organization/")})

    async def capabilities(self) -> bytes:
        if self._capabilities is None:
            statements = []
            for service in self.clients:
                upstream = await self.send(service, "GET", "/fhir/metadata", identity=SYSTEM_IDENTITY)
                if upstream.status != 200:
                    raise UpstreamUnavailable(f"The {service} service did not describe itself")
                statements.append(orjson.loads(upstream.content))
            self._capabilities = orjson.dumps(merge_capabilities(statements, self.settings.base_url))
        return self._capabilities


def _response(upstream: Upstream) -> Response:
    return Response(upstream.content, status_code=upstream.status, headers=upstream.headers, media_type=FHIR_JSON)


def _forward_headers(request: Request) -> dict[str, str]:
    return {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_REQUEST_HEADERS}


def _require(auth: Authenticated, resource_type: str, interaction: str) -> None:
    if resource_type == "AuditEvent":
        _require_auditor(auth, interaction)
    if not auth.scopes.permits(resource_type, interaction):
        names = {"c": "create", "r": "read", "u": "update", "d": "delete", "s": "search"}
        raise Forbidden(
            f"The token's scopes do not allow {names.get(interaction, interaction)} on {resource_type}",
            details={"text": " ".join(auth.identity.scopes)[:200]},
        )


def _require_auditor(auth: Authenticated, interaction: str) -> None:
    """The audit trail is append-only (other systems may add their records, IHE ATNA style; the
    platform refuses to change one) and read by auditors alone."""
    if interaction == "d":
        raise Forbidden("The audit trail is append-only: AuditEvents are never deleted")
    if interaction in ("r", "s") and AUDITOR_ROLE not in auth.identity.roles:
        raise Forbidden("Reading the audit trail needs an auditor's client (scope alliance/audit)")


class FhirDispatcher:
    """Maps one client request onto the owning service(s)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def dispatch(
        self, auth: Authenticated, method: str, segments: list[str], query: str, headers: dict[str, str], body: bytes
    ) -> Upstream:
        path = "/fhir/" + "/".join(segments) + (f"?{query}" if query else "")
        if not segments:
            return await self._bundle(auth, headers, body, path)
        resource_type = segments[0]
        if resource_type.startswith("$"):
            return await self._system_operation(auth, resource_type[1:], method, path, headers, body)
        if resource_type == "_history":
            raise NotSupported("System-wide _history spans services; ask for Type/_history instead")
        if len(segments) == 1 or segments[1] in ("_search", "_history") or segments[1].startswith("$"):
            return await self._type_level(auth, method, segments, query, path, headers, body)
        return await self._instance_level(auth, method, segments, path, headers, body)

    async def _type_level(
        self, auth: Authenticated, method: str, segments: list[str], query: str, path: str,
        headers: dict[str, str], body: bytes,
    ) -> Upstream:
        resource_type = segments[0]
        owners = routing.owners_of(resource_type)
        second = segments[1] if len(segments) > 1 else None
        if (second is None and method == "GET") or second == "_search":
            _require(auth, resource_type, "s")
            params = _params(query) + (_params(body.decode("utf-8", "replace")) if second == "_search" else [])
            services = routing.services_for_search(resource_type, params)
            merged = len(services) > 1 and not _chained(params)
            kept, foreign = foreign_includes.split(resource_type, services if merged else services[:1], params)
            if merged:
                upstream = await self._merged(auth, resource_type, list(services), kept, headers)
                return await self._include_foreign(auth, upstream, foreign)
            service = services[0]
            if foreign:
                path = f"/fhir/{resource_type}?{urlencode(kept)}"
                upstream = await self.gateway.send(service, "GET", path, identity=auth.identity, headers=headers)
                return await self._include_foreign(auth, upstream, foreign)
        elif second == "_history":
            _require(auth, resource_type, "r")
            service = owners[0]
        elif second is not None and second.startswith("$"):
            _require(auth, resource_type, "r" if method == "GET" or second == "$validate" else "u")
            service = owners[0]
        elif method == "POST":
            _require(auth, resource_type, "c")
            service = routing.service_for_resource(_json_object(body)) if len(owners) > 1 else owners[0]
        elif method in ("PUT", "PATCH"):
            _require(auth, resource_type, "u")
            service = owners[0]
        elif method == "DELETE":
            _require(auth, resource_type, "d")
            service = owners[0]
        else:
            raise NotSupported(f"{method} on {resource_type} is not an interaction")
        return await self.gateway.send(service, method, path, identity=auth.identity, headers=headers, content=body)

    async def _include_foreign(
        self, auth: Authenticated, upstream: Upstream, includes: foreign_includes.Plan
    ) -> Upstream:
        if not includes or upstream.status != 200:
            return upstream

        async def fetch(owner: str, target_type: str, query: list[tuple[str, str]], interaction: str) -> tuple[int, bytes]:
            try:
                _require(auth, target_type, interaction)  # an include is no way around the token's scopes
            except Forbidden:
                return 403, b""
            # POST _search: up to 1000 ids or references would not fit a request line.
            answer = await self.gateway.send(
                owner, "POST", f"/fhir/{target_type}/_search", identity=auth.identity,
                headers={"content-type": "application/x-www-form-urlencoded"}, content=urlencode(query).encode())
            return answer.status, answer.content

        content = await foreign_includes.add_included(upstream.content, includes, fetch)
        return Upstream(upstream.status, upstream.headers, content)

    async def _merged(
        self, auth: Authenticated, resource_type: str, services: list[str], params: list[tuple[str, str]],
        headers: dict[str, str],
    ) -> Upstream:
        async def fetch(service: str, query: list[tuple[str, str]]) -> tuple[int, bytes]:
            path = f"/fhir/{resource_type}?{urlencode(query)}"
            upstream = await self.gateway.send(service, "GET", path, identity=auth.identity, headers=headers)
            return upstream.status, upstream.content

        status, body = await merged_search.merged_search(
            resource_type, services, params, fetch, self.gateway.settings.base_url
        )
        return Upstream(status, {}, body)

    async def _instance_level(
        self, auth: Authenticated, method: str, segments: list[str], path: str, headers: dict[str, str], body: bytes
    ) -> Upstream:
        resource_type, resource_id = segments[0], segments[1]
        interaction = {"GET": "r", "PUT": "u", "PATCH": "u", "DELETE": "d", "POST": "u"}.get(method)
        if interaction is None:
            raise NotSupported(f"{method} is not an interaction on {resource_type}/{resource_id[:64]}")
        if len(segments) > 2 and segments[2].startswith("$") and method == "GET":
            interaction = "r"
        _require(auth, resource_type, interaction)
        candidates = routing.services_for_id(resource_type, resource_id)
        if method == "PUT" and len(candidates) > 1:
            candidates = await self._put_candidates(auth, resource_type, resource_id, body, candidates)
        upstream: Upstream | None = None
        for service in candidates:
            upstream = await self.gateway.send(service, method, path, identity=auth.identity, headers=headers, content=body)
            if upstream.status != 404:
                return upstream
        assert upstream is not None
        return upstream

    async def _put_candidates(
        self, auth: Authenticated, resource_type: str, resource_id: str, body: bytes, candidates: tuple[str, ...]
    ) -> tuple[str, ...]:
        # An update goes where the resource lives; a create-by-update where its content says.
        for service in candidates:
            probe = await self.gateway.send(
                service, "GET", f"/fhir/{resource_type}/{resource_id}", identity=auth.identity
            )
            if probe.status in (200, 410):
                return (service,)
        return (routing.service_for_resource(_json_object(body)),)

    async def _system_operation(
        self, auth: Authenticated, name: str, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> Upstream:
        if name not in SYSTEM_OPERATIONS:
            raise NotSupported(f"Operation ${name[:64]} is not supported at the system level")
        service, scope_type = SYSTEM_OPERATIONS[name]
        _require(auth, scope_type, "s")
        return await self.gateway.send(service, method, path, identity=auth.identity, headers=headers, content=body)

    async def _bundle(self, auth: Authenticated, headers: dict[str, str], body: bytes, path: str) -> Upstream:
        bundle = _json_object(body)
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") not in ("batch", "transaction"):
            raise InvalidRequest("POST to the base takes a batch or transaction Bundle")
        entries = bundle.get("entry") or []
        # Checked here too: a batch spanning services is split below, entry by entry, and each
        # piece would pass the service's own check.
        if isinstance(entries, list) and len(entries) > MAX_BUNDLE_ENTRIES:
            raise PayloadTooLarge(f"A Bundle may carry at most {MAX_BUNDLE_ENTRIES} entries, not {len(entries)}")
        services = self._entry_services(auth, bundle)
        distinct = set(services)
        if bundle["type"] == "batch" and MERGED in distinct:
            return await self._split_batch(auth, bundle, headers)
        distinct.discard(MERGED)
        services = [routing.owners_of(_entry_type(bundle, i))[0] if s == MERGED else s for i, s in enumerate(services)]
        if len(distinct) <= 1:
            service = services[0] if services else "referral"
            # The parse goes along to a service in this process (not used here afterwards).
            return await self.gateway.send(service, "POST", path, identity=auth.identity, headers=headers,
                                           content=body, parsed=bundle)
        if bundle["type"] == "transaction":
            return await self._cross_service_transaction(auth, bundle, services, headers)
        return await self._split_batch(auth, bundle, headers)

    async def _cross_service_transaction(
        self, auth: Authenticated, bundle: dict[str, Any], services: list[str], headers: dict[str, str]
    ) -> Upstream:
        """One piece per service, dry-run, then committed or compensated (gateway/cross_transaction.py)."""
        identity = cross_transaction.coordinator(auth.identity)
        prefer = {k: v for k, v in headers.items() if k.lower() == "prefer"}

        async def send(service: str, step: str, body: bytes) -> tuple[int, bytes]:
            step_headers = {**prefer, STEP_HEADER: step, "content-type": "application/json"}
            upstream = await self.gateway.send(
                service, "POST", "/fhir", identity=identity, headers=step_headers, content=body
            )
            return upstream.status, upstream.content

        status, content = await cross_transaction.run(bundle, services, send)
        return Upstream(status, {}, content)

    def _entry_services(self, auth: Authenticated, bundle: dict[str, Any]) -> list[str]:
        services = []
        for index, entry in enumerate(bundle.get("entry") or []):
            request = entry.get("request") if isinstance(entry, dict) else None
            if not isinstance(request, dict) or not isinstance(request.get("url"), str):
                raise InvalidRequest(f"Bundle.entry[{index}].request.url is missing")
            method = str(request.get("method", "")).upper()
            url = request["url"]
            resource_type = url.split("?")[0].split("/")[0]
            interaction = {"GET": "s" if "/" not in url.split("?")[0] else "r", "POST": "c", "PUT": "u",
                           "PATCH": "u", "DELETE": "d", "HEAD": "r"}.get(method, "r")
            _require(auth, resource_type, interaction)
            resource = entry.get("resource")
            if isinstance(resource, dict) and method in ("POST", "PUT"):
                services.append(routing.service_for_resource({**resource, "resourceType": resource_type}))
            else:
                services.append(self._service_for_url(url, resource_type))
        return services

    def _service_for_url(self, url: str, resource_type: str) -> str:
        path, _, query = url.partition("?")
        parts = [p for p in path.split("/") if p]
        if len(parts) > 1:
            return routing.services_for_id(resource_type, parts[1])[0]
        params = _params(query)
        services = routing.services_for_search(resource_type, params)
        # A search of a type several services hold is merged across them, as at the type level.
        return MERGED if len(services) > 1 and not _chained(params) else services[0]

    async def _split_batch(self, auth: Authenticated, bundle: dict[str, Any], headers: dict[str, str]) -> Upstream:
        entries = []
        for entry in bundle.get("entry") or []:
            merged = await self._merged_entry(auth, entry, headers)
            if merged is not None:
                entries.append(merged)
                continue
            single = {"resourceType": "Bundle", "type": "batch", "entry": [entry]}
            upstream = await self._bundle(auth, headers, orjson.dumps(single), "/fhir")
            if upstream.status != 200:
                entries.append({"response": {"status": str(upstream.status), "outcome": orjson.loads(upstream.content)}})
                continue
            entries.extend(orjson.loads(upstream.content).get("entry") or [])
        response = {"resourceType": "Bundle", "type": "batch-response", "entry": entries}
        return Upstream(200, {}, orjson.dumps(response))

    async def _merged_entry(
        self, auth: Authenticated, entry: dict[str, Any], headers: dict[str, str]
    ) -> dict[str, Any] | None:
        """A batch's GET search of a shared type, answered as the type-level search would be."""
        request = entry["request"]
        url = str(request["url"])
        path, _, query = url.partition("?")
        if str(request.get("method", "")).upper() != "GET" or "/" in path.strip("/"):
            return None
        if self._service_for_url(url, path.strip("/")) != MERGED:
            return None
        upstream = await self._type_level(auth, "GET", [path.strip("/")], query, f"/fhir/{url}", headers, b"")
        if upstream.status != 200:
            return {"response": {"status": str(upstream.status), "outcome": orjson.loads(upstream.content)}}
        return {"resource": orjson.loads(upstream.content), "response": {"status": "200 OK"}}


MERGED = "*"  # an entry's "service" when it is a search every owner of its type answers


def _entry_type(bundle: dict[str, Any], index: int) -> str:
    return str(bundle["entry"][index]["request"]["url"]).split("?")[0].split("/")[0]


def access_note(
    request: Request, auth: Authenticated | None, segments: list[str], status: int, body: bytes = b"",
    *, diagnostics: str | None = None, location: str | None = None,
) -> AccessNote:
    """What the audit records of a request; `auth` None: the caller could not be authenticated.
    `location`: the answer's Location header (a create names there what it wrote)."""
    identity = auth.identity if auth is not None else None
    # The answers read for patients: what a GET returned, what an operation answered (a POST
    # `$recognition-check`, `Patient/$merge`, a Task's `$accept`) and what a write of one resource
    # stored; not a bundle's (segments empty), whose patients may be hundreds.
    scanned = request.method == "GET" or bool(segments)
    return AccessNote(
        method=request.method, segments=segments, query=query_string(request) if identity else "", status=status,
        client_id=identity.client_id if identity else "unauthenticated",
        organization=identity.organization if identity else "", recorded=now_micros(),
        request_id=request_id_var.get(), address=request.client.host if request.client else None,
        break_glass=identity.break_glass if identity else None, body=body if scanned else b"",
        diagnostics=diagnostics, written=written_by(location) if len(segments) == 1 and location else None,
    )


def written_by(location: str) -> str | None:
    """`Type/id` of a Location header (`…/fhir/Observation/1/_history/1`)."""
    target = split_reference(location)
    return f"{target['target_type']}/{target['target_id']}" if target["target_type"] else None


def _chained(params: list[tuple[str, str]]) -> bool:
    # A chain or _has is answered by the service holding both ends; it goes to the default owner.
    return any("." in key.split(":")[0] or "." in key or key.startswith("_has") for key, _ in params)


def _params(query: str) -> list[tuple[str, str]]:
    from urllib.parse import parse_qsl

    return parse_qsl(query, keep_blank_values=True)


def _json_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise InvalidRequest("The request has no body")
    value = jsonio.loads(body)
    if not isinstance(value, dict):
        raise InvalidRequest("The body must be a JSON object holding a FHIR resource")
    return value


def create_gateway_app(
    settings: AllianceSettings | None = None,
    *,
    distributed: bool = False,
    clock: Callable[[], int] | None = None,
) -> FastAPI:
    """The whole system (embedded) or the gateway in front of remote services (distributed)."""
    settings = settings or AllianceSettings()
    definitions = service_definitions()
    local = ["platform"] if distributed else list(definitions)
    transports: dict[str, httpx.AsyncBaseTransport] = {}
    apps = {name: create_service_app(definitions[name], settings, transports=transports, clock=clock) for name in local}
    for name, app in apps.items():
        transports[name] = httpx.ASGITransport(app=app)
    clients: dict[str, httpx.AsyncClient] = {}
    for name in definitions:
        if name in transports:
            clients[name] = httpx.AsyncClient(transport=transports[name], base_url=f"http://{name}", timeout=30.0)
        else:
            url = settings.service_url(name)
            if not url:
                raise RuntimeError(f"Distributed mode needs ALLIANCE_{name.upper().replace('-', '_')}_URL")
            clients[name] = httpx.AsyncClient(base_url=url, timeout=30.0, limits=httpx.Limits(max_connections=100))
    gateway = Gateway(settings, clients, local_apps=apps)
    apps["platform"].state.gateway = gateway  # the subscription hub reads resources as each subscriber
    dispatcher = FhirDispatcher(gateway)
    platform_db = apps["platform"].state.database
    audit = AuditTrail(platform_db, apps["platform"].state.service.store,
                       custodians_of=gateway.patient_custodians)
    auth_settings = AuthSettings.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            for service_app in apps.values():
                await stack.enter_async_context(service_app.router.lifespan_context(service_app))
            audit.start()
            stack.push_async_callback(audit.stop)  # drained before the services stop
            try:
                with startup_heap_frozen():  # again: the gateway's own start-up is done now
                    yield
            finally:
                for client in clients.values():
                    await client.aclose()
                await gateway.upstreams.close()

    app = FhirLaneApp(title="County medical alliance FHIR gateway", lifespan=lifespan, docs_url=None, redoc_url=None,
                      openapi_url=None)
    app.state.gateway = gateway
    app.state.audit = audit
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)
    app.state.apps = apps
    app.state.settings = settings
    app.state.auth_settings = auth_settings
    install_exception_handlers(app)
    app.include_router(build_auth_router(get_engine=lambda request: platform_db.engine, settings=auth_settings))

    async def metadata(request: Request) -> Response:
        check_request_format(request)
        return Response(await gateway.capabilities(), media_type=FHIR_JSON)

    async def fhir(request: Request) -> Response:
        path = route_path(request.scope)[len("/fhir"):]
        if request.method in ("GET", "HEAD") and path == "/metadata":
            return await metadata(request)
        if request.method not in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE") or (
                request.method != "POST" and not path.strip("/")):
            raise MethodNotAllowed(f"{request.method} is not allowed here")
        check_request_format(request)
        try:
            auth = await authenticate(request, engine=platform_db.read_engine, settings=auth_settings)
        except FhirError as exc:  # a failed authentication is a security event too
            audit.note(access_note(request, None, [], exc.status_code, diagnostics=exc.diagnostics))
            raise
        try:
            app.state.rate_limiter.check(auth.identity.client_id)
            auth = break_glass(request, auth)
        except FhirError as exc:
            audit.note(access_note(request, auth, [], exc.status_code, diagnostics=exc.diagnostics))
            raise
        segments = [s for s in path.split("/") if s]
        for segment in segments:  # refused before the audit note, which would carry the segment
            if segment in (".", "..") or not PATH_SEGMENT.fullmatch(segment):
                raise InvalidRequest(f"'{segment[:80]}' is not a valid segment of a FHIR path")
        method = "GET" if request.method == "HEAD" else request.method
        try:
            body = await read_body(request) if method in ("POST", "PUT", "PATCH") else b""
            upstream = await dispatcher.dispatch(auth, method, segments, query_string(request), _forward_headers(request), body)
        except FhirError as exc:
            audit.note(access_note(request, auth, segments, exc.status_code, diagnostics=exc.diagnostics))
            raise
        audit.note(access_note(request, auth, segments, upstream.status, upstream.content,
                               location=upstream.headers.get("location")))
        return _response(upstream)

    async def fhir_lane(scope: Any, receive: Any, send: Any) -> None:
        await serve(fhir, scope, receive, send)

    metrics = _metrics(app)
    app.fhir_lane = RequestContextMiddleware(fhir_lane, service="gateway", metrics=metrics)
    app.lane_exclusions = (DISCOVERY_PATH,)
    _health(app, gateway)
    # Services reach the platform types (Consent) here in distributed mode (ALLIANCE_PLATFORM_URL);
    # the platform app accepts only calls carrying the internal signed identity, like every service.
    app.mount(PLATFORM_INTERNAL_PATH, apps["platform"])
    app.add_middleware(RequestContextMiddleware, service="gateway", metrics=metrics)
    return app


def _metrics(app: FastAPI) -> Metrics:
    metrics = Metrics("gateway")

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint() -> Response:
        return metrics.response()

    return metrics


def _health(app: FastAPI, gateway: Gateway) -> None:
    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        states = {}
        for name, client in gateway.clients.items():
            try:
                response = await client.get("/readyz")
                states[name] = "ready" if response.status_code == 200 else "unavailable"
            except httpx.HTTPError:
                states[name] = "unreachable"
        ready = all(state == "ready" for state in states.values())
        return Response(orjson.dumps({"status": "ready" if ready else "unavailable", "services": states}),
                        status_code=200 if ready else 503, media_type="application/json")


__all__ = ["FhirError", "create_gateway_app", "urlencode"]

"""The one way a service becomes an ASGI app: FHIR router, lifespan, health, metrics, identity.

A service passes what makes it itself (its store declaration, operations, migrations); all the
plumbing is here, so the four services differ only in their domain code.
"""

import asyncio
import dataclasses
import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
from fastapi import FastAPI, Request
from sqlalchemy import text
from starlette.responses import JSONResponse, Response

from fhirkit.access import AccessPolicy
from fhirkit.api.dispatch import FhirDispatch, is_fhir_path, route_path
from fhirkit.api.handlers import install_exception_handlers
from fhirkit.api.router import FhirService, Operation
from fhirkit.errors import Unauthorized
from fhirkit.search.values import set_local_time_zone
from fhirkit.store.hooks import ResourceHooks
from fhirkit.store.repository import StoreConfig
from servicekit import topology
from servicekit.consent import apply_consent_event
from servicekit.db import Database
from servicekit.events import EVENTS_LINEAGE, EventOptions, ServiceEvents, shared_bus
from servicekit.grants import TaskGrants, apply_task_grants, task_event_handler
from servicekit.identity import IDENTITY_HEADER, IN_PROCESS_CALLER, CallerIdentity, verify_identity
from servicekit.migrations import FHIRKIT_LINEAGE, Lineage
from servicekit.observability import Metrics, RequestContextMiddleware
from servicekit.peers import Peers
from servicekit.settings import AllianceSettings


@dataclass
class ServiceDefinition:
    """What a service declares about itself (its `fhir.py`)."""

    name: str
    title: str
    resource_types: frozenset[str]
    hooks: dict[str, ResourceHooks] = field(default_factory=dict)
    operations: list[Operation] = field(default_factory=list)
    lineages: list[Lineage] = field(default_factory=list)
    # Who sees what (fhirkit.access); the default shows each organization only what it created.
    access: AccessPolicy = field(default_factory=AccessPolicy)
    # Grants this service records from referral / teleconsultation Tasks (servicekit.grants).
    task_grants: TaskGrants | None = None
    # Whether this service keeps the patients' opt-outs of sharing (servicekit.consent).
    honours_opt_out: bool = False
    # Types written once and never changed (fhirkit StoreConfig.append_only): no history rows.
    append_only: frozenset[str] = frozenset()
    on_startup: list[Callable[[FastAPI], Any]] = field(default_factory=list)
    # Long-running jobs (schedulers): started after start-up, cancelled before shutdown.
    background: list[Callable[[FastAPI], Awaitable[None]]] = field(default_factory=list)

    @property
    def all_lineages(self) -> list[Lineage]:
        return [FHIRKIT_LINEAGE, EVENTS_LINEAGE, *self.lineages]


def new_id_for(service: str) -> Callable[[str], str]:
    import uuid

    prefix = topology.ID_PREFIXES.get(service, "")

    def new_id(resource_type: str) -> str:
        base = str(uuid.uuid4())
        return prefix + base if resource_type in topology.SHARED_TYPES else base

    return new_id


def create_service_app(
    definition: ServiceDefinition,
    settings: AllianceSettings,
    *,
    transports: dict[str, httpx.AsyncBaseTransport] | None = None,
    clock: Callable[[], int] | None = None,
) -> FastAPI:
    secret = settings.secret("internal_secret")
    set_local_time_zone(settings.time_zone)  # how the engine reads dates without a zone, process-wide
    if definition.task_grants is not None:
        grants = dataclasses.replace(definition.task_grants, recent_days=settings.relationship_days_after_close)
        definition = dataclasses.replace(definition, task_grants=grants)
    database = Database(
        settings.database_url(definition.name), pool_size=settings.database_pool_size,
        statement_timeout_seconds=settings.query_timeout_seconds,
    )
    urls = {name: settings.service_url(name) for name in topology.OWNED_TYPES}
    peers = Peers(definition.name, secret, urls, transports, cache_seconds=settings.reference_cache_seconds)
    events = ServiceEvents(definition.name, database, shared_bus(settings), EventOptions.from_settings(settings))
    store = StoreConfig(
        resource_types=definition.resource_types,
        hooks=events.store_hooks(definition.resource_types, _with_task_grants(definition)),
        references=peers,
        new_id=new_id_for(definition.name),
        access=definition.access,
        append_only=definition.append_only,
    )
    if clock is not None:
        store.clock = clock

    async def authenticate(request: Request) -> CallerIdentity:
        handed = request.scope["extensions"].get(IN_PROCESS_CALLER) if "extensions" in request.scope else None
        if handed is not None:  # called in this process (servicekit.inprocess)
            return cast(CallerIdentity, handed)
        token = request.headers.get(IDENTITY_HEADER)
        if not token:
            raise Unauthorized(
                "Requests reach services only through the gateway, which signs the caller's identity",
                headers={"WWW-Authenticate": 'Bearer realm="alliance-internal"'},
            )
        return verify_identity(token, secret)

    service = FhirService(
        name=definition.name,
        store=store,
        database=database,
        authenticate=authenticate,
        operations=definition.operations,
        title=definition.title,
    )
    metrics = Metrics(definition.name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await database.start()
        for hook in definition.on_startup:
            await hook(app)
        await _subscribe_task_grants(definition, events)
        if definition.honours_opt_out:
            await events.subscribe(f"{definition.name}-opt-outs", "platform.Consent.*", apply_consent_event)
        await events.start()  # after on_startup, where the service subscribes its consumers
        jobs = [asyncio.create_task(job(app), name=f"{definition.name}:{job.__name__}") for job in definition.background]
        try:
            with startup_heap_frozen():
                yield
        finally:
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            await events.stop()
            await peers.close()
            await database.stop()

    app = FhirLaneApp(title=definition.title, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.database = database
    app.state.peers = peers
    app.state.events = events
    app.state.bus = events.bus
    app.state.service = service
    app.state.settings = settings
    install_exception_handlers(app)
    app.fhir_lane = RequestContextMiddleware(FhirDispatch(service), service=definition.name, metrics=metrics)
    _health_routes(app, database, metrics)
    app.add_middleware(RequestContextMiddleware, service=definition.name, metrics=metrics)
    return app


@contextmanager
def startup_heap_frozen() -> Iterator[None]:
    """While the app serves, what start-up built (modules, the search parameter table, compiled
    statements, pools: about 200,000 objects) is kept out of the garbage collector's full
    collections, which a busy worker runs every few seconds and which walked all of it: 130-170 ms
    each with every request of the worker waiting, 2 ms after (bench/README.md). At shutdown it is
    handed back, so that a process building many apps (the tests) can still free their cycles."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class FhirLaneApp(FastAPI):
    """An app whose `/fhir` requests take the FHIR lane (fhirkit.api.dispatch) instead of FastAPI's
    routing, which costs more than a read itself; the rest (health, metrics, token endpoint, paths
    under `lane_exclusions`) stays with FastAPI."""

    fhir_lane: Any = None
    lane_exclusions: tuple[str, ...] = ()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (self.fhir_lane is not None and scope["type"] == "http" and is_fhir_path(path := route_path(scope))
                and not path.startswith(self.lane_exclusions)):
            scope["app"] = self
            await self.fhir_lane(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


class _TaskGrantHooks:
    """A service's Task hooks, then the grants the written Task implies, in its transaction."""

    def __init__(self, inner: ResourceHooks, rule: TaskGrants) -> None:
        self.inner, self.rule = inner, rule

    async def before_write(self, repo: Any, resource: dict[str, Any] | None, context: Any) -> None:
        await self.inner.before_write(repo, resource, context)

    async def after_write(self, repo: Any, resource: dict[str, Any] | None, context: Any) -> None:
        await self.inner.after_write(repo, resource, context)
        if resource is not None:
            await apply_task_grants(repo.conn, resource, self.rule, repo.config.clock())


def _with_task_grants(definition: ServiceDefinition) -> dict[str, ResourceHooks]:
    rule = definition.task_grants
    if rule is None or definition.name not in rule.from_services or "Task" not in definition.resource_types:
        return definition.hooks
    from fhirkit.store.hooks import NoHooks

    return {**definition.hooks, "Task": _TaskGrantHooks(definition.hooks.get("Task") or NoHooks(), rule)}


async def _subscribe_task_grants(definition: ServiceDefinition, events: ServiceEvents) -> None:
    rule = definition.task_grants
    for service in rule.from_services if rule else ():
        if service != definition.name:
            await events.subscribe(f"grants-from-{service}", f"{service}.Task.*", task_event_handler(rule))


def _health_routes(app: FastAPI, database: Database, metrics: Metrics) -> None:
    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        try:
            async with database.transaction(write=False) as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "reason": type(exc).__name__}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint() -> Response:
        return metrics.response()

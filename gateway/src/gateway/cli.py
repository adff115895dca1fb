"""`alliance`: serve, migrate, load directories and the demo, register API clients.

Every command reads the same `ALLIANCE_*` settings as the servers, so it acts on the embedded
SQLite files by default and on the distributed databases and services when those are configured.
"""

import asyncio
import getpass
import json
import os
import secrets
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from servicekit.settings import AllianceSettings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="County medical alliance interoperability service")
directory_app = typer.Typer(no_args_is_help=True, help="The alliance directory")
client_app = typer.Typer(no_args_is_help=True, help="API clients (SMART Backend Services)")
demo_app = typer.Typer(no_args_is_help=True, help="The demo alliance")
app.add_typer(directory_app, name="directory")
app.add_typer(client_app, name="client")
app.add_typer(demo_app, name="demo")
catalog_app = typer.Typer(no_args_is_help=True, help="The recognition catalog (互认项目目录)")
app.add_typer(catalog_app, name="catalog")
audit_app = typer.Typer(no_args_is_help=True, help="The audit trail (AuditEvent)")
app.add_typer(audit_app, name="audit")

SERVE_TARGETS = ("all", "gateway", "directory", "referral", "results-sharing", "telemedicine")
DEMO_DIRECTORY = Path(__file__).resolve().parents[3] / "services/directory/src/directory/demo/alliance.yaml"
DEMO_SCOPE = "system/*.cruds"
T = TypeVar("T")


def _settings() -> AllianceSettings:
    return AllianceSettings()


@app.command()
def serve(
    service: Annotated[str, typer.Option(help=f"What to serve: {', '.join(SERVE_TARGETS)}")] = "all",
    host: Annotated[str | None, typer.Option(help="Bind address (default ALLIANCE_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default ALLIANCE_PORT or PORT)")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Server processes (docs/operations.md)")] = 1,
) -> None:
    """Serve the whole system (embedded), the gateway alone, or one service (distributed)."""
    import uvicorn

    if service not in SERVE_TARGETS:
        raise typer.BadParameter(f"--service must be one of {', '.join(SERVE_TARGETS)}")
    settings = _settings()
    os.environ["ALLIANCE_SERVE"] = service
    bind_port = port or int(os.environ.get("PORT") or settings.port)
    if service in ("all", "gateway") and not os.environ.get("ALLIANCE_PUBLIC_BASE_URL"):
        os.environ["ALLIANCE_PUBLIC_BASE_URL"] = f"http://{host or settings.host}:{bind_port}/fhir"
    if workers > 1:
        _prepare_workers(settings, workers)
    from servicekit.pg_budget import connection_budget
    from servicekit.settings import SERVICES

    served = SERVICES if service == "all" else ["platform" if service == "gateway" else service]
    for warning in connection_budget([settings.database_url(name) for name in served], workers,
                                     settings.database_pool_size):
        typer.echo(f"warning: {warning}", err=True)
    if workers > 1 and sys.platform == "linux":  # a socket per worker (gateway.workers)
        from gateway.workers import serve_workers

        try:
            serve_workers("gateway.cli:serve_worker_app", host or settings.host, bind_port, workers,
                          log_config=None, access_log=False)
        except OSError as error:  # the address is taken (another server on the port)
            typer.echo(f"error: cannot listen on {host or settings.host}:{bind_port}: {error.strerror}", err=True)
            raise typer.Exit(1) from None
        return
    uvicorn.run("gateway.cli:serve_worker_app" if workers > 1 else "gateway.main:create_app", factory=True,
                host=host or settings.host, port=bind_port, workers=workers, log_config=None, access_log=False)


def _prepare_workers(settings: AllianceSettings, workers: int) -> None:
    """What the worker processes must agree on, settled once before they start."""
    import math

    # Development secrets are generated on first use: N workers generating them at once could
    # each keep a different key (tokens of one worker refused by the others).
    if settings.environment != "production":
        settings.secret("internal_secret")
        settings.secret("token_signing_key")
    # Rate limits are counted in each process's memory: each worker enforces its share, so that
    # the configured numbers stay the whole server's (docs/operations.md).
    if settings.rate_limit_per_second > 0:
        os.environ["ALLIANCE_RATE_LIMIT_PER_SECOND"] = repr(settings.rate_limit_per_second / workers)
        os.environ["ALLIANCE_RATE_LIMIT_BURST"] = str(max(1, math.ceil(settings.rate_limit_burst / workers)))
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    os.environ["ALLIANCE_SERVE_STARTUP_LOCK"] = str((settings.data_dir / ".serve-startup.lock").resolve())


def serve_worker_app() -> Any:
    """One worker of `serve --workers N` (uvicorn factory): the usual app, whose start-up (the
    services writing their topics and code systems, starting dispatchers) runs one worker at a
    time, so that workers starting on fresh databases do not race to create the same rows."""
    from contextlib import AsyncExitStack

    from gateway.main import create_app

    server = create_app()
    inner = server.router.lifespan_context
    lock_path = Path(os.environ["ALLIANCE_SERVE_STARTUP_LOCK"])

    @asynccontextmanager
    async def lifespan(target: Any) -> AsyncIterator[Any]:
        async with AsyncExitStack() as stack:
            async with _startup_turn(lock_path):
                state = await stack.enter_async_context(inner(target))
            yield state

    server.router.lifespan_context = lifespan
    return server


@asynccontextmanager
async def _startup_turn(path: Path) -> AsyncIterator[None]:
    """An exclusive lock on a file, held while one worker starts (released if it dies)."""
    import fcntl

    with open(path, "a") as handle:
        await asyncio.to_thread(fcntl.flock, handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@app.command()
def migrate(
    service: Annotated[str, typer.Option(help="all, or one of directory, referral, results-sharing, telemedicine, platform")] = "all",
) -> None:
    """Bring each service's database to the latest schema (the engine's tables, then its own)."""
    from gateway.app import service_definitions
    from servicekit.migrations import upgrade

    settings = _settings()
    definitions = service_definitions()
    names = list(definitions) if service == "all" else [service]
    for name in names:
        if name not in definitions:
            raise typer.BadParameter(f"Unknown service '{name}'")
        upgrade(settings.database_url(name), definitions[name].all_lineages)
        typer.echo(f"migrated {name}")


@app.command("reindex-dates")
def reindex_dates(
    service: Annotated[str, typer.Option(help="all, or one of directory, referral, results-sharing, telemedicine, platform")] = "all",
) -> None:
    """Recompute the date index in ALLIANCE_TIME_ZONE, after changing it on databases holding data
    (zone-less dates are indexed in that zone). Run it with the servers stopped."""
    from sqlalchemy import create_engine

    from fhirkit.store.reindex import recompute_date_index
    from gateway.app import service_definitions
    from servicekit.db import sync_url

    settings = _settings()
    definitions = service_definitions()
    for name in list(definitions) if service == "all" else [service]:
        if name not in definitions:
            raise typer.BadParameter(f"Unknown service '{name}'")
        engine = create_engine(sync_url(settings.database_url(name)))
        try:
            with engine.begin() as connection:
                count = recompute_date_index(connection, settings.time_zone)
        finally:
            engine.dispose()
        typer.echo(f"{name}: date index of {count} resources recomputed in {settings.time_zone}")


@asynccontextmanager
async def _system(settings: AllianceSettings) -> AsyncIterator[Any]:
    """The gateway with its services, in-process (or remote ones when URLs are configured)."""
    from gateway.app import create_gateway_app

    distributed = bool(settings.directory_url)
    gateway_app = create_gateway_app(settings, distributed=distributed)
    async with gateway_app.router.lifespan_context(gateway_app):
        yield gateway_app


async def _load_directory(path: Path, settings: AllianceSettings) -> str:
    from directory.directory_file import parse_directory_file

    content = parse_directory_file(path)
    async with _system(settings) as gateway_app:
        return await _directory_into(gateway_app, content)


async def _directory_into(gateway_app: Any, content: Any) -> str:
    """Load a parsed directory file through the running gateway's directory service."""
    from directory.load import load_directory
    from servicekit.peers import SYSTEM_IDENTITY

    report = await load_directory(content, _poster(gateway_app, "directory", SYSTEM_IDENTITY))
    return f"{content.alliance}: {report}"


def _poster(gateway_app: Any, service: str, identity: Any) -> Callable[[bytes], Awaitable[tuple[int, bytes]]]:
    """What a loader sends its Bundles with: POST /fhir to `service` through the running gateway,
    as `identity`; answers (status, body)."""
    gateway = gateway_app.state.gateway

    async def send(body: bytes) -> tuple[int, bytes]:
        upstream = await gateway.send(
            service, "POST", "/fhir", identity=identity, headers={"content-type": "application/fhir+json"},
            content=body,
        )
        return upstream.status, upstream.content

    return send


@directory_app.command("load")
def directory_load(file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Directory file (YAML)")]) -> None:
    """Load (or update) the alliance directory from a file; see docs/directory-file.md."""
    from directory.directory_file import DirectoryFileError
    from directory.load import DirectoryLoadError

    try:
        typer.echo(asyncio.run(_load_directory(file, _settings())))
    except (DirectoryFileError, DirectoryLoadError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


async def _load_results_sharing(load: Any, settings: AllianceSettings, *, as_organization: str | None = None) -> str:
    async with _system(settings) as gateway_app:
        return await _results_sharing_into(gateway_app, load, as_organization=as_organization)


async def _results_sharing_into(gateway_app: Any, load: Any, *, as_organization: str | None = None) -> str:
    """Run a results-sharing loader (`results_sharing.load`) against the service, through the
    running gateway: as the server itself, or as the organization that produces what it loads."""
    from servicekit.identity import CallerIdentity
    from servicekit.peers import SYSTEM_IDENTITY

    identity = SYSTEM_IDENTITY if as_organization is None else CallerIdentity(
        client_id="alliance-demo-loader", organization=as_organization, scopes=("system/*.cruds",), level="center")
    return str(await load(_poster(gateway_app, "results-sharing", identity)))


@catalog_app.command("load")
def catalog_load(file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="Catalog file (YAML)")]) -> None:
    """Load a version of the recognition catalog; see docs/results-sharing.md."""
    from results_sharing.load import RecognitionLoadError, load_catalog

    try:
        typer.echo(asyncio.run(_load_results_sharing(lambda send: load_catalog(file, send), _settings())))
    except RecognitionLoadError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@audit_app.command("verify")
def audit_verify() -> None:
    """Recompute the audit trail's hash chain; exit 1 at the first AuditEvent changed, removed or
    reordered since it was written (docs/security.md)."""
    verdict = asyncio.run(_verify_audit(_settings()))
    if verdict.broken_at is not None:
        typer.echo(f"BROKEN at link {verdict.broken_at} after {verdict.checked} good links: {verdict.problem}", err=True)
        raise typer.Exit(1)
    typer.echo(f"ok: {verdict.checked} AuditEvents, chain intact")


async def _verify_audit(settings: AllianceSettings) -> Any:
    from gateway import audit_chain

    async with _platform_database(settings) as database, database.transaction(write=False) as conn:
        return await audit_chain.verify(conn)


@asynccontextmanager
async def _platform_database(settings: AllianceSettings) -> AsyncIterator[Any]:
    from servicekit.db import Database

    database = Database(settings.database_url("platform"))
    await database.start()
    try:
        yield database
    finally:
        await database.stop()


@dataclass
class _ClientAdmin:
    """What a client command works with: the platform database and the audit trail."""

    engine: Any
    audit: Any

    def record(
        self, action: str, client_id: str | None, organization: str = "", status: int = 200,
        description: str | None = None,
    ) -> None:
        """Every client command leaves an AuditEvent, refused ones too (docs/security.md)."""
        from fhirkit.search.values import now_micros
        from gateway.audit import ClientAdminNote

        self.audit.note(ClientAdminNote(
            action=action, client_id=client_id, organization=organization, status=status, recorded=now_micros(),
            operator=_operator(), host=socket.gethostname() or None, description=description,
        ))


def _operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (containers)
        return f"uid:{os.getuid()}"


@asynccontextmanager
async def _client_admin(settings: AllianceSettings) -> AsyncIterator[_ClientAdmin]:
    # The whole system starts so that the audit trail's writer runs; leaving drains it.
    async with _system(settings) as gateway_app:
        engine = gateway_app.state.apps["platform"].state.database.engine
        yield _ClientAdmin(engine, gateway_app.state.audit)


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


@client_app.command("list")
def client_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")] = False,
) -> None:
    """List the API clients: id, organization, enabled, authentication, created, last token."""
    rows = asyncio.run(_list_clients(_settings()))
    if as_json:
        typer.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    header = {"client_id": "CLIENT", "organization": "ORGANIZATION", "enabled": "ENABLED",
              "auth_methods": "AUTH", "created_at": "CREATED", "last_used_at": "LAST USED"}
    table = [header] + [{**row, "enabled": "yes" if row["enabled"] else "no",
                         "auth_methods": ",".join(row["auth_methods"]) or "-",
                         "created_at": row["created_at"][:19], "last_used_at": (row["last_used_at"] or "-")[:19]}
                        for row in rows]
    widths = {key: max(len(str(line[key])) for line in table) for key in header}
    for line in table:
        typer.echo("  ".join(str(line[key]).ljust(widths[key]) for key in header).rstrip())


async def _list_clients(settings: AllianceSettings) -> list[dict[str, Any]]:
    from gateway.auth import list_clients

    async with _client_admin(settings) as admin:
        clients = await list_clients(admin.engine)
        admin.record("list", None)
    return [{
        "client_id": c.client_id, "name": c.name, "organization": c.organization, "level": c.level,
        "enabled": c.enabled, "auth_methods": list(c.auth_methods), "scope": c.scope,
        "created_at": c.created_at.isoformat(),
        "last_used_at": c.last_used_at.isoformat() if c.last_used_at else None,
    } for c in clients]


@client_app.command("disable")
def client_disable(client_id: Annotated[str, typer.Argument(help="The client to disable")]) -> None:
    """Disable an API client: new tokens are refused and issued ones stop working within seconds."""
    _set_client_enabled(client_id, False)


@client_app.command("enable")
def client_enable(client_id: Annotated[str, typer.Argument(help="The client to enable again")]) -> None:
    """Enable a disabled API client again."""
    _set_client_enabled(client_id, True)


def _set_client_enabled(client_id: str, enabled: bool) -> None:
    from gateway.auth import get_client, set_enabled

    action = "enable" if enabled else "disable"

    async def change() -> bool:
        async with _client_admin(_settings()) as admin:
            client = await get_client(admin.engine, client_id)
            if client is None or not await set_enabled(admin.engine, client_id, enabled):
                admin.record(action, client_id, status=404, description="no such client")
                return False
            admin.record(action, client_id, client.organization)
            return True

    if not asyncio.run(change()):
        raise _fail(f"no client '{client_id}'")
    typer.echo(f"{client_id}: {'enabled' if enabled else 'disabled'}")


@client_app.command("rotate-secret")
def client_rotate_secret(client_id: Annotated[str, typer.Argument(help="The client whose secret to replace")]) -> None:
    """Give a client a new secret (printed only now); the old one stops working at once."""
    from gateway.auth import rotate_secret

    secret = asyncio.run(_change_client("rotate-secret", client_id, lambda engine: rotate_secret(engine, client_id)))
    assert secret is not None
    typer.echo(json.dumps({"client_id": client_id, "client_secret": secret}, indent=2))


@client_app.command("set-jwks")
def client_set_jwks(
    client_id: Annotated[str, typer.Argument(help="The client whose public keys to replace")],
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JWKS file with the client's public keys")],
) -> None:
    """Replace a client's registered JWK Set (private_key_jwt); assertions signed with keys no
    longer in it are refused from now on."""
    from gateway.auth import set_jwks

    try:
        jwks = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(f"{file} is not JSON: {exc}") from None
    asyncio.run(_change_client("set-jwks", client_id, lambda engine: set_jwks(engine, client_id, jwks)))
    typer.echo(f"{client_id}: {len(jwks['keys'])} public key(s) registered")


async def _change_client(action: str, client_id: str, change: Callable[[Any], Awaitable[T]]) -> T:
    """Apply `change` to an existing client; the outcome (done, no such client, refused) is audited."""
    from gateway.auth import get_client

    async with _client_admin(_settings()) as admin:
        client = await get_client(admin.engine, client_id)
        if client is None:
            admin.record(action, client_id, status=404, description="no such client")
            raise _fail(f"no client '{client_id}'")
        try:
            result = await change(admin.engine)
        except ValueError as exc:
            admin.record(action, client_id, client.organization, status=422, description=str(exc))
            raise _fail(str(exc)) from None
        admin.record(action, client_id, client.organization)
        return result


@client_app.command("create")
def client_create(
    org: Annotated[str, typer.Option("--org", help="The client's organization, e.g. Organization/qingxi-county-hospital")],
    scope: Annotated[str, typer.Option(help='SMART scopes, e.g. "system/Patient.rs system/Task.cru"')],
    name: Annotated[str | None, typer.Option(help="A name for people")] = None,
    level: Annotated[str | None, typer.Option(help="village, township, county, city, provincial or center")] = None,
    client_id: Annotated[str | None, typer.Option(help="A chosen client id (default: generated)")] = None,
    jwks: Annotated[Path | None, typer.Option(help="JWKS file with the client's public keys (private_key_jwt)")] = None,
) -> None:
    """Register an API client and print its credentials (the secret is shown only now)."""
    keys = json.loads(jwks.read_text()) if jwks else None
    try:
        client = asyncio.run(_create_client(_settings(), org, scope, name or org, level, client_id, keys))
    except ValueError as exc:
        raise _fail(str(exc)) from None
    typer.echo(json.dumps(client, ensure_ascii=False, indent=2))


async def _create_client(
    settings: AllianceSettings, org: str, scope: str, name: str, level: str | None,
    client_id: str | None, jwks: dict[str, Any] | None, secret: str | None = None,
) -> dict[str, Any]:
    from gateway.auth import create_client

    async with _client_admin(settings) as admin:
        try:
            client = await create_client(
                admin.engine, organization=org, scope=scope, name=name, level=level, jwks=jwks,
                client_id=client_id, client_secret=secret,
            )
        except ValueError as exc:
            admin.record("create", client_id, "", status=422, description=str(exc))
            raise
        admin.record("create", client.client_id, client.organization)
    return {
        "client_id": client.client_id,
        "client_secret": client.client_secret,
        "organization": client.organization,
        "name": client.name,
        "level": client.level,
        "scope": client.scope,
        "token_url": settings.base_url.rsplit("/fhir", 1)[0] + "/auth/token",
    }


@demo_app.command("load")
def demo_load() -> None:
    """Load the demo alliance and write one API client per organization to data/demo-clients.json."""
    for line in asyncio.run(_load_demo(_settings())):
        typer.echo(line)


async def _load_demo(settings: AllianceSettings) -> list[str]:
    """The directory, the recognition catalog and quality records, the demo lab's results and the
    demo clients, through one running system (each start of the system costs about a second)."""
    from directory.directory_file import parse_directory_file
    from results_sharing.load import DEMO_LAB, load_demo, load_demo_results

    content = parse_directory_file(DEMO_DIRECTORY)
    async with _system(settings) as gateway_app:
        lines = [await _directory_into(gateway_app, content)]
        lines.append(await _results_sharing_into(gateway_app, load_demo))
        lines.append(await _results_sharing_into(gateway_app, load_demo_results, as_organization=DEMO_LAB))
        path = await _demo_clients(gateway_app, settings, content)
    return [*lines, f"demo clients written to {path}"]


async def _demo_clients(gateway_app: Any, settings: AllianceSettings, content: Any) -> Path:
    from directory.identifiers import FACILITY_CODES
    from gateway.auth import create_client

    path = settings.data_dir / "demo-clients.json"
    previous = {c["client_id"]: c for c in json.loads(path.read_text())} if path.exists() else {}
    engine = gateway_app.state.apps["platform"].state.database.engine

    async def register(org: dict[str, Any]) -> dict[str, Any]:
        code = _facility_code(org)
        level = _level(code, FACILITY_CODES)
        client_id = f"demo-{org['id']}"
        # A re-run keeps each client's secret; scrypt runs in threads, so the clients are hashed
        # side by side rather than one after another.
        secret = previous.get(client_id, {}).get("client_secret") or secrets.token_urlsafe(32)
        client = await create_client(
            engine, organization=f"Organization/{org['id']}", scope=DEMO_SCOPE, name=org["name"],
            level=level, client_id=client_id, client_secret=secret,
        )
        return {
            "client_id": client.client_id,
            "client_secret": secret,
            "organization": f"Organization/{org['id']}",
            "name": org["name"],
            "level": level,
            "facility": code,
            "scope": client.scope,
        }

    clients = await asyncio.gather(*(register(org) for org in content.organizations))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clients, ensure_ascii=False, indent=2))
    path.chmod(0o600)
    return path


def _facility_code(org: dict[str, Any]) -> str:
    for concept in org.get("type", []):
        for coding in concept.get("coding", []):
            if coding.get("system", "").endswith("/CodeSystem/facility-level"):
                return coding["code"]
    return ""


def _level(code: str, table: Any) -> str:
    facility = table.get(code)
    if facility is None or facility.kind != "tier":
        return "center"
    return {"village-clinic": "village", "township-health-center": "township", "county-hospital": "county",
            "city-hospital": "city", "provincial-hospital": "provincial"}[code]


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()

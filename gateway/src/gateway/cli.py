"""`alliance`: serve, migrate, load directories and the demo, register API clients.

Every command reads the same `ALLIANCE_*` settings as the servers, so it acts on the embedded
SQLite files by default and on the distributed databases and services when those are configured.
"""

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

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


def _settings() -> AllianceSettings:
    return AllianceSettings()


@app.command()
def serve(
    service: Annotated[str, typer.Option(help=f"What to serve: {', '.join(SERVE_TARGETS)}")] = "all",
    host: Annotated[str | None, typer.Option(help="Bind address (default ALLIANCE_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default ALLIANCE_PORT or PORT)")] = None,
    workers: Annotated[int, typer.Option(help="Server processes")] = 1,
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
    uvicorn.run(
        "gateway.main:create_app",
        factory=True,
        host=host or settings.host,
        port=bind_port,
        workers=workers,
        log_config=None,
        access_log=False,
    )


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
    from directory.load import load_directory
    from servicekit.peers import SYSTEM_IDENTITY

    content = parse_directory_file(path)
    async with _system(settings) as gateway_app:
        gateway = gateway_app.state.gateway

        async def send(body: bytes) -> tuple[int, bytes]:
            upstream = await gateway.send(
                "directory", "POST", "/fhir", identity=SYSTEM_IDENTITY,
                headers={"content-type": "application/fhir+json"}, content=body,
            )
            return upstream.status, upstream.content

        report = await load_directory(content, send)
    return f"{content.alliance}: {report}"


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
    """Run a results-sharing loader (`results_sharing.load`) against the service, through the
    gateway: as the server itself, or as the organization that produces what it loads."""
    from servicekit.identity import CallerIdentity
    from servicekit.peers import SYSTEM_IDENTITY

    identity = SYSTEM_IDENTITY if as_organization is None else CallerIdentity(
        client_id="alliance-demo-loader", organization=as_organization, scopes=("system/*.cruds",), level="center")
    async with _system(settings) as gateway_app:
        gateway = gateway_app.state.gateway

        async def send(body: bytes) -> tuple[int, bytes]:
            upstream = await gateway.send(
                "results-sharing", "POST", "/fhir", identity=identity,
                headers={"content-type": "application/fhir+json"}, content=body,
            )
            return upstream.status, upstream.content

        return str(await load(send))


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


@client_app.command("disable")
def client_disable(client_id: Annotated[str, typer.Argument(help="The client to disable")]) -> None:
    """Disable an API client: new tokens are refused and issued ones stop working within seconds."""
    _set_client_enabled(client_id, False)


@client_app.command("enable")
def client_enable(client_id: Annotated[str, typer.Argument(help="The client to enable again")]) -> None:
    """Enable a disabled API client again."""
    _set_client_enabled(client_id, True)


def _set_client_enabled(client_id: str, enabled: bool) -> None:
    from gateway.auth import set_enabled

    async def change() -> bool:
        async with _platform_database(_settings()) as database:
            return await set_enabled(database.engine, client_id, enabled)

    if not asyncio.run(change()):
        typer.echo(f"error: no client '{client_id}'", err=True)
        raise typer.Exit(1)
    typer.echo(f"{client_id}: {'enabled' if enabled else 'disabled'}")


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
    client = asyncio.run(_create_client(_settings(), org, scope, name or org, level, client_id, keys))
    typer.echo(json.dumps(client, ensure_ascii=False, indent=2))


async def _create_client(
    settings: AllianceSettings, org: str, scope: str, name: str, level: str | None,
    client_id: str | None, jwks: dict[str, Any] | None, secret: str | None = None,
) -> dict[str, Any]:
    from gateway.auth import create_client

    async with _system(settings) as gateway_app:
        engine = gateway_app.state.apps["platform"].state.database.engine
        client = await create_client(
            engine, organization=org, scope=scope, name=name, level=level, jwks=jwks,
            client_id=client_id, client_secret=secret,
        )
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
    settings = _settings()
    typer.echo(asyncio.run(_load_directory(DEMO_DIRECTORY, settings)))
    from results_sharing.load import DEMO_LAB, load_demo, load_demo_results

    typer.echo(asyncio.run(_load_results_sharing(load_demo, settings)))
    typer.echo(asyncio.run(_load_results_sharing(load_demo_results, settings, as_organization=DEMO_LAB)))
    path = asyncio.run(_demo_clients(settings))
    typer.echo(f"demo clients written to {path}")


async def _demo_clients(settings: AllianceSettings) -> Path:
    from directory.directory_file import parse_directory_file
    from directory.identifiers import FACILITY_CODES
    from gateway.auth import create_client

    path = settings.data_dir / "demo-clients.json"
    previous = {c["client_id"]: c for c in json.loads(path.read_text())} if path.exists() else {}
    content = parse_directory_file(DEMO_DIRECTORY)
    clients = []
    async with _system(settings) as gateway_app:
        engine = gateway_app.state.apps["platform"].state.database.engine
        for org in content.organizations:
            code = _facility_code(org)
            level = _level(code, FACILITY_CODES)
            client_id = f"demo-{org['id']}"
            secret = previous.get(client_id, {}).get("client_secret")
            client = await create_client(
                engine, organization=f"Organization/{org['id']}", scope=DEMO_SCOPE, name=org["name"],
                level=level, client_id=client_id, client_secret=secret,
            )
            clients.append({
                "client_id": client.client_id,
                "client_secret": secret or client.client_secret,
                "organization": f"Organization/{org['id']}",
                "name": org["name"],
                "level": level,
                "facility": code,
                "scope": client.scope,
            })
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

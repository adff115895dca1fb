"""Real parts for the event tests: migrated scratch databases (SQLite and PostgreSQL), buses
(in-process and NATS JetStream on the local broker, or a private nats-server a test may kill),
and a consumer that records what it handled in its own table.

PostgreSQL runs when `ALLIANCE_TEST_POSTGRES_URL` is set; NATS when a server answers at
`ALLIANCE_TEST_NATS_URL` (default nats://127.0.0.1:4222).
"""

import asyncio
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import AsyncConnection

from fhirkit.store.repository import Repository, StoreConfig
from servicekit.db import Database, sync_url
from servicekit.events.bus import EventBus, InProcessBus
from servicekit.events.consumers import RetryPolicy
from servicekit.events.dispatcher import DispatcherOptions
from servicekit.events.envelope import Event
from servicekit.events.runtime import EventOptions, ServiceEvents
from servicekit.events.tables import EVENTS_LINEAGE
from servicekit.migrations import FHIRKIT_LINEAGE, Lineage, upgrade

POSTGRES_URL = os.environ.get("ALLIANCE_TEST_POSTGRES_URL")
NATS_URL = os.environ.get("ALLIANCE_TEST_NATS_URL", "nats://127.0.0.1:4222")
NATS_SERVER = shutil.which("nats-server") or (
    "/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None
)

# A table the test consumers write their effects to, in the handler's transaction.
EFFECTS_DDL = """
CREATE TABLE test_event_effects (
    consumer VARCHAR(128) NOT NULL,
    event_id VARCHAR(36) NOT NULL,
    seq BIGINT NOT NULL,
    subject VARCHAR(255) NOT NULL,
    resource_id VARCHAR(64),
    version_id INTEGER,
    handled BIGINT NOT NULL
)
"""

FAST_RETRY = RetryPolicy(max_attempts=3, backoff=0.05, backoff_max=0.2)


def fast_options(poll_interval: float = 0.2, batch_size: int = 200) -> EventOptions:
    return EventOptions(
        dispatcher=DispatcherOptions(poll_interval=poll_interval, batch_size=batch_size, retry_pause_max=0.5),
        retry=FAST_RETRY,
    )


# --- databases -----------------------------------------------------------------------------


def migrate(url: str, lineages: list[Lineage] | None = None) -> None:
    upgrade(url, lineages or [FHIRKIT_LINEAGE, EVENTS_LINEAGE])
    engine = create_engine(sync_url(url))
    with engine.begin() as conn:
        conn.execute(text(EFFECTS_DDL))
    engine.dispose()


def _use_wal(path: Path) -> None:
    # Alembic leaves the file in rollback-journal mode, and servicekit.db switches it to WAL on
    # connect before setting its busy timeout: several first connections at once can then fail
    # with "database is locked". A deployed database is switched once by its first server start.
    import sqlite3

    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")


def _admin_url() -> str:
    assert POSTGRES_URL
    return POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://").rstrip("/") + "/postgres"


def _pg_execute(*statements: str) -> None:
    import psycopg

    with psycopg.connect(_admin_url(), autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)  # type: ignore[arg-type]


class DatabaseTemplates:
    """Migrate once per session, then copy: a fresh database per test costs milliseconds."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._sqlite: Path | None = None
        self._postgres: str | None = None
        self._created: list[str] = []

    def sqlite(self) -> str:
        if self._sqlite is None:
            self._sqlite = self.directory / "template.db"
            migrate(f"sqlite+aiosqlite:///{self._sqlite}")
            _use_wal(self._sqlite)
        copy = self.directory / f"{uuid.uuid4().hex[:12]}.db"
        shutil.copy(self._sqlite, copy)
        return f"sqlite+aiosqlite:///{copy}"

    def postgres(self) -> str:
        assert POSTGRES_URL
        if self._postgres is None:
            self._postgres = f"evtpl_{uuid.uuid4().hex[:10]}"
            _pg_execute(f'CREATE DATABASE "{self._postgres}"')
            self._created.append(self._postgres)
            migrate(f"{POSTGRES_URL.rstrip('/')}/{self._postgres}")
        name = f"ev_{uuid.uuid4().hex[:12]}"
        _pg_execute(f'CREATE DATABASE "{name}" TEMPLATE "{self._postgres}"')
        self._created.append(name)
        return f"{POSTGRES_URL.rstrip('/')}/{name}"

    def url(self, kind: str) -> str:
        return self.sqlite() if kind == "sqlite" else self.postgres()

    def drop_all(self) -> None:
        if self._created:
            _pg_execute(
                *(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in reversed(self._created))
            )


# --- NATS ------------------------------------------------------------------------------------


def nats_reachable(url: str = NATS_URL) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 4222), timeout=0.5):
            return True
    except OSError:
        return False


def make_bus(kind: str, url: str = NATS_URL, **options: Any) -> EventBus:
    """A fresh bus; a NATS one gets its own stream and subject prefix, removed by `drop_bus`."""
    if kind == "inprocess":
        return InProcessBus()
    from servicekit.events.nats_bus import NatsBus

    tag = uuid.uuid4().hex[:10]
    defaults: dict[str, Any] = {
        "stream": f"TEST_EVENTS_{tag}",
        "subject_prefix": f"test.{tag}.events",
        "publish_timeout": 2.0,
    }
    return NatsBus(url, **{**defaults, **options})


async def drop_bus(bus: EventBus) -> None:
    from servicekit.events.nats_bus import NatsBus

    if not isinstance(bus, NatsBus):
        return
    import nats
    import nats.js.errors

    try:
        client = await nats.connect(bus.url, connect_timeout=2, max_reconnect_attempts=2)
    except Exception:
        return
    try:
        await client.jetstream().delete_stream(bus.stream)
    except nats.js.errors.NotFoundError:
        pass  # never created
    finally:
        await client.close()


class PrivateNatsServer:
    """A nats-server of the test's own (port and store), so that a test may kill and restart
    a broker without disturbing anyone else's."""

    def __init__(self, store: Path) -> None:
        assert NATS_SERVER, "nats-server is not installed"
        self.store = store
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert NATS_SERVER
        self.process = subprocess.Popen(
            [NATS_SERVER, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not nats_reachable(self.url):
            if time.monotonic() > deadline:
                raise RuntimeError("the private nats-server did not start")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # SIGKILL: no chance to flush or say goodbye
            self.process.wait(timeout=10)
        self.process = None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- a service and a recording consumer -----------------------------------------------------


@dataclass
class Recorder:
    """A consumer handler that writes one effect row per event, in the handler's transaction,
    and can be told to fail (to test redelivery and parking)."""

    name: str
    fail_once_for: set[str] = field(default_factory=set)  # resource ids whose first delivery fails
    fail_always_for: set[str] = field(default_factory=set)  # resource ids that always fail
    calls: list[str] = field(default_factory=list)  # event id of every call, committed or not
    failures: list[str] = field(default_factory=list)  # resource id of every call that failed

    async def __call__(self, event: Event, conn: AsyncConnection) -> None:
        self.calls.append(event.id)
        if event.resource_id in self.fail_always_for:
            self.failures.append(event.resource_id)
            raise RuntimeError(f"refusing {event.subject} on purpose")
        if event.resource_id in self.fail_once_for:
            self.fail_once_for.discard(event.resource_id)
            self.failures.append(event.resource_id)
            raise RuntimeError(f"failing {event.subject} once on purpose")
        await conn.execute(
            text(
                "INSERT INTO test_event_effects"
                " (consumer, event_id, seq, subject, resource_id, version_id, handled)"
                " VALUES (:consumer, :event_id, :seq, :subject, :resource_id, :version_id, :handled)"
            ),
            {
                "consumer": self.name,
                "event_id": event.id,
                "seq": event.seq,
                "subject": event.subject,
                "resource_id": event.resource_id,
                "version_id": event.version_id,
                "handled": time.monotonic_ns(),
            },
        )


async def effects(database: Database, consumer: str) -> list[dict[str, Any]]:
    async with database.transaction(write=False) as conn:
        rows = await conn.execute(
            text("SELECT * FROM test_event_effects WHERE consumer = :c ORDER BY handled"), {"c": consumer}
        )
        return [dict(row._mapping) for row in rows]


async def count(database: Database, table: str, where: str = "1=1", **params: Any) -> int:
    async with database.transaction(write=False) as conn:
        result = await conn.execute(text(f"SELECT COUNT(*) FROM {table} WHERE {where}"), params)
        return int(result.scalar_one())


def store_for(events: ServiceEvents) -> StoreConfig:
    types = frozenset({"Patient", "Observation"})
    return StoreConfig(resource_types=types, hooks=events.store_hooks(types, {}), check_references=False)


async def write_patients(
    database: Database, store: StoreConfig, count_: int, *, prefix: str = "p"
) -> list[str]:
    """Create `count_` patients, one transaction each; returns their ids."""
    ids = []
    for index in range(count_):
        async with database.transaction(write=True) as conn:
            outcome = await Repository(conn, store, owner="Organization/test").create(
                {"resourceType": "Patient", "active": True, "name": [{"family": f"{prefix}{index}"}]},
                resource_id=f"{prefix}-{index}",
            )
            ids.append(outcome.stored.resource_id)
    return ids


async def wait_for(predicate: Any, timeout: float = 15.0, interval: float = 0.02) -> None:
    """Await `predicate()` (sync or async) until true; fail the test with a clear message."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@asynccontextmanager
async def started(*services: ServiceEvents) -> AsyncIterator[None]:
    for service in services:
        await service.start()
    try:
        yield
    finally:
        for service in services:
            await service.stop()


@asynccontextmanager
async def running(url: str) -> AsyncIterator[Database]:
    database = Database(url)
    await database.start()
    try:
        yield database
    finally:
        await database.stop()


def database_params() -> list[Any]:
    """pytest parameters for the databases the event tests run on (PostgreSQL when configured)."""
    import pytest

    skip = pytest.mark.skipif(not POSTGRES_URL, reason="ALLIANCE_TEST_POSTGRES_URL is not set")
    return ["sqlite", pytest.param("postgres", marks=skip)]


def bus_params() -> list[Any]:
    """pytest parameters for the buses: in-process always, NATS when a server answers."""
    import pytest

    skip = pytest.mark.skipif(not nats_reachable(), reason="no NATS server at ALLIANCE_TEST_NATS_URL")
    return ["inprocess", pytest.param("nats", marks=skip)]

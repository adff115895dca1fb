"""The system under test as real processes: databases, `alliance` commands, servers, tokens, memory.

Every server runs in its own session (process group) so that stopping it also stops the uvicorn
workers it spawned; the suite stops only the groups it started.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ALLIANCE = str(Path(sys.executable).parent / "alliance")
REPO = Path(__file__).resolve().parents[1]
SERVICES = ("directory", "referral", "results-sharing", "telemedicine")
DATABASES = (*SERVICES, "platform")
# Fixed secrets: the suite signs service identities itself (the gateway-hop figure).
SECRETS = {
    "ALLIANCE_INTERNAL_SECRET": "bench-internal-secret-0123456789abcdef0123456789",
    "ALLIANCE_TOKEN_SIGNING_KEY": "bench-token-signing-key-0123456789abcdef012345",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- databases ----------------------------------------------------------------------------------

def admin_url(base_url: str) -> str:
    return libpq_url(base_url).rstrip("/") + "/postgres"


def libpq_url(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as psycopg (libpq) takes it."""
    return url.replace("postgresql+psycopg://", "postgresql://")


def _libpq_urls(urls: Any) -> list[str]:
    """The PostgreSQL ones of `urls`, for psycopg."""
    return [libpq_url(url) for url in urls if url.startswith("postgresql")]


@contextmanager
def postgres_databases(base_url: str, names: list[str]) -> Iterator[dict[str, str]]:
    """Fresh databases named `names`, dropped afterwards (even when the run fails)."""
    try:
        yield create_databases(base_url, names)
    finally:
        drop_databases(base_url, names)


def create_databases(base_url: str, names: Iterable[str]) -> dict[str, str]:
    """Databases named `names`, empty (dropped first if they exist); their URLs by name."""
    import psycopg

    names = list(names)
    with psycopg.connect(admin_url(base_url), autocommit=True) as conn:
        for name in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
    return {name: f"{base_url.rstrip('/')}/{name}" for name in names}


def drop_databases(base_url: str, names: Iterable[str]) -> None:
    import psycopg

    with psycopg.connect(admin_url(base_url), autocommit=True) as conn:
        for name in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_version(base_url: str | None) -> str:
    if base_url is None:
        import sqlite3

        return f"SQLite {sqlite3.sqlite_version}"
    import psycopg

    with psycopg.connect(admin_url(base_url)) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return f"PostgreSQL {row[0] if row else '?'}"


def analyze(urls: Any) -> None:
    """VACUUM ANALYZE every service database after a load, as an operator does after a bulk
    import (and autovacuum does on its own within a minute: since PostgreSQL 13 it vacuums tables
    that only grow, too). Without statistics PostgreSQL plans a search by patient and code as if
    every index held one row: a nested loop over all rows of the code; without the VACUUM no page
    is marked all-visible, and every index-only scan still reads the table's rows. The machine
    this suite was written on runs PostgreSQL with autovacuum off. Then a CHECKPOINT
    (where the role may), so that the figures do not run beside the writing-out of a fast load
    (seen: a 1,000,000 load at 1,025/s, then every figure slower than after a 484/s one).
    SQLite: nothing."""
    import psycopg

    postgres = _libpq_urls(urls)
    for url in postgres:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
    if postgres:
        with psycopg.connect(postgres[0], autocommit=True) as conn:
            try:
                conn.execute("CHECKPOINT")  # the whole server's: one is enough
            except psycopg.errors.InsufficientPrivilege:
                print("  (no CHECKPOINT: the role may not; figures may overlap the load's writes)", flush=True)


def events_pending(urls: Any) -> int | None:
    """Outbox events not yet delivered, over the service databases: taken as a load ends, how far
    the dispatchers were behind it (notifications and alerts wait that long). PostgreSQL only."""
    import psycopg

    postgres = _libpq_urls(urls)
    if not postgres:
        return None
    pending = 0
    for url in postgres:
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT count(*) FROM servicekit_outbox WHERE published_at IS NULL").fetchone()
            pending += int(row[0]) if row else 0
    return pending


def autovacuum(base_url: str | None) -> str | None:
    if base_url is None:
        return None
    import psycopg

    with psycopg.connect(admin_url(base_url)) as conn:
        row = conn.execute("SHOW autovacuum").fetchone()
    return str(row[0]) if row else None


def pool_size_for(database_urls: dict[str, str], workers: int) -> dict[str, str]:
    """The pool size an operator sets after `alliance serve` warned that the pools may open more
    connections than PostgreSQL accepts (servicekit.pg_budget): each worker keeps up to the pool
    size per database. With the default (20) and this machine's 100 connections, 13.6 % of the
    reads at 32 connections were 503s (session 10). Nothing on SQLite."""
    from servicekit.pg_budget import largest_pool, server_max_connections

    postgres = [url for url in database_urls.values() if url.startswith("postgresql")]
    limit = server_max_connections(postgres[0]) if postgres else None
    if limit is None:
        return {}
    return {"ALLIANCE_DATABASE_POOL_SIZE": str(max(2, min(20, largest_pool(limit, workers, len(postgres)))))}


def environment(data_dir: Path, database_urls: dict[str, str], **extra: str) -> dict[str, str]:
    """What an operator would export: the bench's secrets, data dir and databases, the rate
    limiter off (the bench measures the server, not the limiter), quiet logs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLIANCE_")}
    env.update(SECRETS)
    env["ALLIANCE_DATA_DIR"] = str(data_dir)
    env["ALLIANCE_LOG_LEVEL"] = "WARNING"
    env["ALLIANCE_RATE_LIMIT_PER_SECOND"] = "0"
    for service, url in database_urls.items():
        env[f"ALLIANCE_{service.upper().replace('-', '_')}_DATABASE_URL"] = url
    env.update(extra)
    return env


def run_cli(env: dict[str, str], *args: str, timeout: float = 600) -> str:
    result = subprocess.run([ALLIANCE, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"alliance {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


# --- servers ------------------------------------------------------------------------------------

@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    extra: dict[str, str] = field(default_factory=dict)

    def rss_kb(self) -> dict[int, int]:
        """VmRSS of the server and every process under it (uvicorn's workers)."""
        return {pid: _vm_rss_kb(pid) for pid in _process_tree(self.process.pid)}

    def cpu_seconds(self) -> dict[int, float]:
        """User + system CPU seconds so far of the server and every process under it: how the
        work spread over the workers."""
        return {pid: _cpu_seconds(pid) for pid in _process_tree(self.process.pid)}

    def cpu_seconds_since(self, before: dict[int, float]) -> dict[int, float]:
        """Each process's CPU seconds since `before` (a `cpu_seconds()` taken earlier)."""
        return {pid: round(seconds - before.get(pid, 0.0), 1) for pid, seconds in self.cpu_seconds().items()}


def start(name: str, command: list[str], env: dict[str, str], port: int, log_dir: Path,
          ready_path: str = "/healthz", timeout: float = 90) -> Server:
    log = log_dir / f"{name}-{port}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                   start_new_session=True)
    server = Server(name, f"http://127.0.0.1:{port}", process, log)
    try:
        _wait_ready(server, ready_path, timeout)
    except BaseException:
        stop(server)
        raise
    return server


def serve(env: dict[str, str], service: str, port: int, workers: int, log_dir: Path) -> Server:
    command = [ALLIANCE, "serve", "--service", service, "--port", str(port), "--workers", str(workers)]
    return start(service, command, env, port, log_dir)


def stop(server: Server) -> None:
    """SIGTERM to the server's process group, SIGKILL if it has not gone within 20 s."""
    if server.process.poll() is not None:
        return
    try:
        os.killpg(server.process.pid, signal.SIGTERM)
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=10)
    except ProcessLookupError:
        pass


def _wait_ready(server: Server, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            tail = server.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n{tail}")
        try:
            if httpx.get(server.url + path, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{server.name} at {server.url} did not become ready in {timeout:.0f} s")


def _process_tree(root: int) -> list[int]:
    found, queue = [], [root]
    while queue:
        pid = queue.pop()
        found.append(pid)
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                queue += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def postgres_cpu_seconds(databases: Iterable[str]) -> dict[str, float]:
    """CPU seconds so far of the local PostgreSQL backends connected to each of `databases` (a
    backend's title is `postgres: <cluster>: <user> <database> <client> <state>`). Pooled
    connections live through a figure, so the difference of two readings is the figure's
    database work; a backend that exits in between takes its share with it."""
    wanted = set(databases)
    seconds = dict.fromkeys(wanted, 0.0)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").split()
        except OSError:
            continue
        if len(title) > 3 and title[0] == "postgres:" and title[3] in wanted:
            seconds[title[3]] += _cpu_seconds(int(entry.name))
    return seconds


def _vm_rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# --- tokens -------------------------------------------------------------------------------------

class Tokens:
    """Bearer tokens for the demo clients (`alliance demo load` writes their secrets), renewed
    well before the five-minute expiry: a large load runs for hours."""

    RENEW_SECONDS = 200

    def __init__(self, base: str, data_dir: Path) -> None:
        self.base = base
        self.clients = {c["client_id"]: c for c in json.loads((data_dir / "demo-clients.json").read_text())}
        self._cache: dict[str, tuple[float, str]] = {}

    def get(self, client_id: str) -> str:
        cached = self._cache.get(client_id)
        if cached and time.monotonic() - cached[0] < self.RENEW_SECONDS:
            return cached[1]
        client = self.clients[client_id]
        response = httpx.post(f"{self.base}/auth/token", auth=(client["client_id"], client["client_secret"]),
                              data={"grant_type": "client_credentials", "scope": client["scope"]}, timeout=30)
        response.raise_for_status()
        token = str(response.json()["access_token"])
        self._cache[client_id] = (time.monotonic(), token)
        return token


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"

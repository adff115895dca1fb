"""Real server processes for end-to-end tests: `alliance serve` exactly as an operator runs it."""

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ALLIANCE = str(Path(sys.executable).parent / "alliance")
SECRETS = {
    "ALLIANCE_INTERNAL_SECRET": "live-internal-secret-0123456789abcdef012345678",
    "ALLIANCE_TOKEN_SIGNING_KEY": "live-token-signing-key-0123456789abcdef01234",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def environment(data_dir: Path, database_urls: dict[str, str] | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALLIANCE_")}
    env.update(SECRETS)
    env["ALLIANCE_DATA_DIR"] = str(data_dir)
    env["ALLIANCE_LOG_LEVEL"] = "WARNING"
    # Servers started by tests share one PostgreSQL (max_connections 100 here) with the session's
    # in-process system: small pools, so that a burst of requests queues instead of being refused.
    env["ALLIANCE_DATABASE_POOL_SIZE"] = "3"
    for name, url in (database_urls or {}).items():
        env[f"ALLIANCE_{name.upper().replace('-', '_')}_DATABASE_URL"] = url
    env.update(extra)
    return env


def run_cli(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([ALLIANCE, *args], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"alliance {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@contextmanager
def serve(env: dict[str, str], service: str, port: int) -> Iterator[str]:
    with server_process(env, port, "--service", service) as (url, _process):
        yield url


@contextmanager
def server_process(env: dict[str, str], port: int, *args: str, timeout: float = 60.0) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`alliance serve --port PORT ARGS…`, its output in the data directory; on the way out
    SIGTERM (which a `--workers` parent passes to its workers), then SIGKILL if it lingers."""
    name = "-".join(a.lstrip("-") for a in args) or "all"
    with open(Path(env["ALLIANCE_DATA_DIR"]) / f"{name}-{port}.log", "w") as log:
        process = subprocess.Popen(
            [ALLIANCE, "serve", "--port", str(port), *args], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, process, timeout=timeout)
            yield url, process
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server at {url} exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server at {url} did not become ready")


def create_client(env: dict[str, str], organization: str, scope: str = "system/*.cruds") -> dict[str, str]:
    return json.loads(run_cli(env, "client", "create", "--org", organization, "--scope", scope, "--level", "county"))


def token(base: str, client: dict[str, str]) -> str:
    response = httpx.post(
        f"{base}/auth/token",
        data={"grant_type": "client_credentials", "scope": client["scope"]},
        auth=(client["client_id"], client["client_secret"]),
    )
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def wait_until(what: str, check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1) -> Any:
    """Poll `check` until it answers something true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


class NotificationReceiver:
    """A subscriber's rest-hook endpoint: a threaded HTTP server on 127.0.0.1 recording every
    notification bundle it is sent."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        bodies, lock = self.bodies, self._lock

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with lock:
                    bodies.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def statuses(self, kind: str) -> list[dict[str, Any]]:
        """The SubscriptionStatus of each notification of `kind` (handshake, event-notification…)."""
        with self._lock:
            bodies = list(self.bodies)
        first = [b["entry"][0]["resource"] for b in bodies]
        return [s for s in first if s["type"] == kind]

    def events(self) -> list[tuple[int, str]]:
        """(event number, focus) of every event received, duplicates included, in arrival order."""
        return [(int(e["eventNumber"]), e["focus"]["reference"].split("/fhir/")[-1])
                for s in self.statuses("event-notification") for e in s.get("notificationEvent", [])]

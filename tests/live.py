"""Real server processes for end-to-end tests: `alliance serve` exactly as an operator runs it."""

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
    log = open(Path(env["ALLIANCE_DATA_DIR"]) / f"{service}-{port}.log", "w")
    process = subprocess.Popen(
        [ALLIANCE, "serve", "--service", service, "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


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

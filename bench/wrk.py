"""Driving load with wrk (a separate process on loopback) and reading its figures back.

A scenario is a method, headers, a pool of paths and optionally a body template; bench/request.lua
draws from them per request. Errors are every non-2xx/3xx answer (wrk's `errors.status`: status
> 399) plus socket errors and timeouts.
"""

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).with_name("request.lua")


@dataclass
class Load:
    """What one wrk run sends."""

    method: str
    paths: list[str]
    headers: dict[str, str] = field(default_factory=dict)
    body: str | None = None  # template with {{UID}}, {{PATIENT}}, {{CODE}}
    patients: list[str] | None = None
    codes: list[str] | None = None


def ensure_wrk() -> str:
    """wrk's path; installs the Debian package when it is missing and we may (root with apt)."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk is missing: apt-get install -y wrk", flush=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=False, capture_output=True)
        found = shutil.which("wrk")
        if found:
            return found
    raise SystemExit("wrk is required: install it with `sudo apt-get install -y wrk` (Debian/Ubuntu) "
                     "or `brew install wrk` (macOS), then run the bench again")


def lua_string(text: str) -> str:
    # Lua strings are bytes: UTF-8 passes through; only quote, backslash and line ends need escapes.
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def lua_data(load: Load) -> str:
    def strings(values: list[str]) -> str:
        return "{" + ",\n".join(lua_string(v) for v in values) + "}"

    headers = "{" + ", ".join(f"[{lua_string(k)}] = {lua_string(v)}" for k, v in load.headers.items()) + "}"
    parts = [f"method = {lua_string(load.method)}", f"headers = {headers}", f"paths = {strings(load.paths)}"]
    if load.body is not None:
        parts.append(f"body = {lua_string(load.body)}")
    if load.patients:
        parts.append(f"patients = {strings(load.patients)}")
    if load.codes:
        parts.append(f"codes = {strings(load.codes)}")
    return "return {\n" + ",\n".join(parts) + "\n}\n"


def run(base: str, load: Load, *, connections: int, seconds: float, threads: int = 1,
        timeout_seconds: int = 10) -> dict[str, Any]:
    """One wrk run against `base`; the figures wrk's done() wrote, with rates derived."""
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as work:
        data, out = Path(work) / "data.lua", Path(work) / "out.json"
        data.write_text(lua_data(load), encoding="utf-8")
        env = {**os.environ, "BENCH_DATA": str(data), "BENCH_OUT": str(out)}
        command = [ensure_wrk(), "-t", str(min(threads, connections)), "-c", str(connections),
                   "-d", f"{max(1, round(seconds))}s", "--timeout", f"{timeout_seconds}s",
                   "-s", str(SCRIPT), base]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 120)
        if result.returncode != 0 or not out.exists():
            raise RuntimeError(f"wrk failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        raw = json.loads(out.read_text())
    return summarise(raw, connections)


def summarise(raw: dict[str, Any], connections: int) -> dict[str, Any]:
    seconds = raw["duration_us"] / 1e6
    errors = sum(raw["errors"].values())
    latency = raw["latency_us"]
    return {
        "connections": connections,
        "requests": raw["requests"],
        "seconds": round(seconds, 2),
        "rps": round(raw["requests"] / seconds, 1) if seconds else 0.0,
        "p50_ms": round(latency["p50"] / 1000, 2),
        "p95_ms": round(latency["p95"] / 1000, 2),
        "p99_ms": round(latency["p99"] / 1000, 2),
        "max_ms": round(latency["max"] / 1000, 2),
        "errors": errors,
        "error_rate": round(errors / raw["requests"], 4) if raw["requests"] else 1.0,
        "error_detail": raw["errors"],
    }

"""Structured logs with a request id that crosses services, and Prometheus metrics.

The request id comes from `X-Request-ID` (set by the gateway, or by the client) or is minted
here, and is echoed in the response. Logs never carry patient identifiers or bodies: only the
method, the path template's resource type, status and timing.
"""

import contextvars
import logging
import sys
import time
import uuid
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-ID"
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": request_id_var.get(),
        }
        for key in ("service", "method", "route", "status", "duration_ms"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure_logging(level: str = "INFO", json_format: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else logging.Formatter("%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries that log request URLs would leak ids and search values, which may identify a patient.
    for noisy in ("uvicorn.access", "httpx", "httpcore", "aiohttp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class Metrics:
    def __init__(self, service: str) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "alliance_http_requests_total", "HTTP requests", ["service", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "alliance_http_request_seconds", "HTTP request latency", ["service", "method"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.service = service
        # The labelled series by (method, status): `labels()` checks and locks on every call.
        self._series: dict[tuple[str, int], tuple[Any, Any]] = {}

    def observe(self, method: str, status: int, seconds: float) -> None:
        series = self._series.get((method, status))
        if series is None:
            series = self._series[(method, status)] = (
                self.requests.labels(self.service, method, str(status)), self.latency.labels(self.service, method))
        series[0].inc()
        series[1].observe(seconds)

    def response(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class RequestContextMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware overhead): request id, access log, metrics."""

    def __init__(self, app: ASGIApp, service: str, metrics: Metrics) -> None:
        self.app = app
        self.service = service
        self.metrics = metrics
        self.log = logging.getLogger(f"alliance.{service}")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _header(scope, b"x-request-id") or uuid.uuid4().hex
        token = request_id_var.set(request_id[:64])
        started = time.perf_counter()
        status_holder = {"status": 500}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id[:64].encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            method, status = scope["method"], status_holder["status"]
            self.metrics.observe(method, status, elapsed)
            if self.log.isEnabledFor(logging.INFO):  # the access log's fields only when it is written
                self.log.info(
                    "request", extra={"service": self.service, "method": method, "route": _route(scope),
                                      "status": status, "duration_ms": round(elapsed * 1000, 2)},
                )
            request_id_var.reset(token)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def _route(scope: Scope) -> str:
    # Only the resource type: ids and query strings may identify a patient.
    parts = [p for p in scope.get("path", "").split("/") if p]
    if parts and parts[0] == "fhir":
        parts = parts[1:]
    return "/" + (parts[0] if parts else "")


def request_id(request: Request) -> str:
    return request_id_var.get()

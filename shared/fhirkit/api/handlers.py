"""Every error leaves as an OperationOutcome, rendered here and nowhere else."""

import logging
import sqlite3

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from fhirkit.api.responses import FHIR_JSON, outcome_bytes
from fhirkit.errors import FhirError, QueryTooCostly, UpstreamUnavailable

log = logging.getLogger("fhirkit")

_HTTP_ISSUE_CODES = {404: "not-found", 405: "not-supported", 401: "login", 403: "forbidden", 413: "too-costly"}
QUERY_CANCELED = "57014"  # PostgreSQL: statement_timeout reached
# PostgreSQL SQLSTATE classes that mean "cannot serve now", not a bug: 08 connection exception,
# 53 insufficient resources (53300 too many connections), 57P03 cannot connect now (starting up).
_UNAVAILABLE_STATES = ("08", "53", "57P03")
RETRY_AFTER_SECONDS = "5"


def safe_path(path: str) -> str:
    """The request path with its ids blanked, for logs: logs carry no patient identifiers."""
    kept = [s if s[:1].isupper() or s.startswith(("$", "_")) or s == "fhir" else ":id" for s in path.split("/") if s]
    return "/" + "/".join(kept)


def error_response(exc: FhirError) -> Response:
    return Response(exc.to_bytes(), status_code=exc.status_code, headers=exc.headers, media_type=FHIR_JSON)


def install_exception_handlers(app: FastAPI) -> None:
    for kind in (FhirError, RequestValidationError, StarletteHTTPException, DBAPIError, PoolTimeout, Exception):
        app.add_exception_handler(kind, _handler)


async def _handler(request: Request, exc: Exception) -> Response:
    return response_for_error(request, exc)


def response_for_error(request: Request, exc: Exception) -> Response:
    """The OperationOutcome answering a failed request (FastAPI's handlers and the FHIR lane)."""
    if isinstance(exc, FhirError):
        if exc.status_code >= 500:
            log.error("request failed: %s", exc.diagnostics)
        return error_response(exc)
    if isinstance(exc, RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        body = outcome_bytes("error", "invalid", f"Invalid request {where}: {first.get('msg', 'invalid')}")
        return Response(body, status_code=400, media_type=FHIR_JSON)
    if isinstance(exc, StarletteHTTPException):
        code = _HTTP_ISSUE_CODES.get(exc.status_code, "processing")
        body = outcome_bytes("error", code, str(exc.detail))
        return Response(body, status_code=exc.status_code, media_type=FHIR_JSON, headers=exc.headers)
    if isinstance(exc, DBAPIError) and _cancelled_for_time(exc.orig):
        return error_response(QueryTooCostly(
            "The query took longer than the server allows (ALLIANCE_QUERY_TIMEOUT_SECONDS); narrow it: "
            "fewer parameters with wide matches, a smaller _count, fewer _include/_revinclude"))
    if _database_unavailable(exc):
        log.warning("database unavailable on %s %s: %s", request.method, safe_path(request.url.path), type(exc).__name__)
        return error_response(UpstreamUnavailable(
            "The database cannot take the request now; retry shortly", headers={"Retry-After": RETRY_AFTER_SECONDS}))
    # A bug, not a client error: log the trace, never send it.
    log.error("unexpected error on %s %s", request.method, safe_path(request.url.path), exc_info=exc)
    body = outcome_bytes("fatal", "exception", "Internal error; it has been logged")
    return Response(body, status_code=500, media_type=FHIR_JSON)


def _cancelled_for_time(error: BaseException | None) -> bool:
    """PostgreSQL's statement_timeout, or SQLite's progress handler (servicekit.sqlite_inline)."""
    if getattr(error, "sqlstate", None) == QUERY_CANCELED:
        return True
    return isinstance(error, sqlite3.OperationalError) and getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_INTERRUPT


def _database_unavailable(exc: Exception) -> bool:
    """A refused or lost database connection, or no pooled connection free in time: the client may
    retry, so 503 with Retry-After rather than 500."""
    if isinstance(exc, PoolTimeout):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    state = getattr(exc.orig, "sqlstate", None) or ""
    if state.startswith(_UNAVAILABLE_STATES):
        return True
    if isinstance(exc.orig, sqlite3.OperationalError):  # the write lock stayed taken past our patience
        return getattr(exc.orig, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    # psycopg raises OperationalError without a SQLSTATE when it cannot connect at all.
    return isinstance(exc.orig, psycopg.OperationalError) and not state

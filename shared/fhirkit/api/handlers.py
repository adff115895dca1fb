"""Every error leaves as an OperationOutcome, rendered here and nowhere else."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from fhirkit.api.responses import FHIR_JSON, outcome_bytes
from fhirkit.errors import FhirError

log = logging.getLogger("fhirkit")

_HTTP_ISSUE_CODES = {404: "not-found", 405: "not-supported", 401: "login", 403: "forbidden", 413: "too-costly"}


def error_response(exc: FhirError) -> Response:
    return Response(exc.to_bytes(), status_code=exc.status_code, headers=exc.headers, media_type=FHIR_JSON)


def install_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(FhirError)
    async def fhir_error(request: Request, exc: FhirError) -> Response:
        if exc.status_code >= 500:
            log.error("request failed: %s", exc.diagnostics)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        body = outcome_bytes("error", "invalid", f"Invalid request {where}: {first.get('msg', 'invalid')}")
        return Response(body, status_code=400, media_type=FHIR_JSON)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = _HTTP_ISSUE_CODES.get(exc.status_code, "processing")
        body = outcome_bytes("error", code, str(exc.detail))
        return Response(body, status_code=exc.status_code, media_type=FHIR_JSON, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        # A bug, not a client error: log the trace, never send it.
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        body = outcome_bytes("fatal", "exception", "Internal error; it has been logged")
        return Response(body, status_code=500, media_type=FHIR_JSON)

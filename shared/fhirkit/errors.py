"""The one error hierarchy of the FHIR engine.

Every failure a client can cause is a `FhirError` subclass that knows its HTTP status and its
OperationOutcome issue code; `fhirkit.api.handlers` renders them in one place. The table of
classes below is the only mapping from error category to status.
"""

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import orjson


class FhirError(Exception):
    status_code: ClassVar[int] = 500
    issue_code: ClassVar[str] = "exception"
    severity: ClassVar[str] = "error"

    def __init__(
        self,
        diagnostics: str,
        *,
        expression: Sequence[str] = (),
        headers: Mapping[str, str] | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(diagnostics)
        self.diagnostics = diagnostics
        self.expression = list(expression)
        self.headers = dict(headers or {})
        self.details = dict(details or {})

    def issues(self) -> list[dict[str, Any]]:
        issue: dict[str, Any] = {
            "severity": self.severity,
            "code": self.issue_code,
            "diagnostics": self.diagnostics,
        }
        if self.expression:
            issue["expression"] = self.expression
        if self.details:
            issue["details"] = dict(self.details)
        return [issue]

    def to_outcome(self) -> dict[str, Any]:
        return {"resourceType": "OperationOutcome", "issue": self.issues()}

    def locate(self, where: str) -> None:
        """Say where the problem is (a Bundle entry) in front of every issue's diagnostics."""
        self.diagnostics = f"{where}: {self.diagnostics}"

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.to_outcome())


@contextmanager
def located(where: str) -> Iterator[None]:
    """A FhirError raised inside says where its problem is (a Bundle entry), before any issue."""
    try:
        yield
    except FhirError as exc:
        exc.locate(where)
        raise


class InvalidRequest(FhirError):
    status_code, issue_code = 400, "invalid"


class InvalidResource(FhirError):
    """A resource that fails structural validation; may carry several issues."""

    status_code, issue_code = 400, "invalid"

    def __init__(self, diagnostics: str, *, issues: Sequence[Mapping[str, Any]] = (), **kwargs: Any) -> None:
        super().__init__(diagnostics, **kwargs)
        self.extra_issues = [dict(i) for i in issues]

    def issues(self) -> list[dict[str, Any]]:
        return self.extra_issues or super().issues()

    def locate(self, where: str) -> None:
        super().locate(where)
        for issue in self.extra_issues:
            issue["diagnostics"] = f"{where}: {issue.get('diagnostics', '')}"


class NotSupported(FhirError):
    status_code, issue_code = 400, "not-supported"


class UnknownSearchParameter(FhirError):
    status_code, issue_code = 400, "not-supported"


class Unauthorized(FhirError):
    status_code, issue_code = 401, "login"


class Forbidden(FhirError):
    status_code, issue_code = 403, "forbidden"


class ResourceNotFound(FhirError):
    status_code, issue_code = 404, "not-found"


class UnknownResourceType(FhirError):
    status_code, issue_code = 404, "not-supported"


class MethodNotAllowed(FhirError):
    status_code, issue_code = 405, "not-supported"


class NotAcceptable(FhirError):
    status_code, issue_code = 406, "not-supported"


class VersionConflict(FhirError):
    status_code, issue_code = 409, "conflict"


class DuplicateResource(FhirError):
    status_code, issue_code = 409, "duplicate"


class ResourceGone(FhirError):
    status_code, issue_code = 410, "deleted"


class PreconditionFailed(FhirError):
    status_code, issue_code = 412, "conflict"


class MultipleMatches(FhirError):
    """A conditional interaction whose criteria match more than one resource."""

    status_code, issue_code = 412, "multiple-matches"


class PayloadTooLarge(FhirError):
    status_code, issue_code = 413, "too-costly"


class UnsupportedMediaType(FhirError):
    status_code, issue_code = 415, "not-supported"


class BusinessRuleViolation(FhirError):
    status_code, issue_code = 422, "business-rule"


class UnprocessableEntity(FhirError):
    """Well-formed but semantically unusable input, such as a reference to a missing resource."""

    status_code, issue_code = 422, "processing"


class TooManyRequests(FhirError):
    status_code, issue_code = 429, "throttled"


class QueryTooCostly(FhirError):
    """The database gave up on a query after the configured time (ALLIANCE_QUERY_TIMEOUT_SECONDS)."""

    status_code, issue_code = 422, "too-costly"


class UpstreamUnavailable(FhirError):
    status_code, issue_code = 503, "transient"


class UpstreamTimeout(FhirError):
    status_code, issue_code = 504, "timeout"


class InternalError(FhirError):
    status_code, issue_code = 500, "exception"

"""Structural validation of FHIR R4 resources with the fhir.resources R4B models.

Validation runs once per write; reads never build a model (ARCHITECTURE.md §3).
"""

import re
from functools import cache
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from fhirkit.errors import InvalidRequest, InvalidResource

FHIR_VERSION = "4.0.1"
ID_PATTERN = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
TYPE_PATTERN = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
MAX_REPORTED_ISSUES = 20


@cache
def model_class(resource_type: str) -> Any:
    try:
        return get_fhir_model_class(resource_type)
    except (KeyError, ValueError, AttributeError, ImportError):
        return None


def is_resource_type(name: str) -> bool:
    return bool(TYPE_PATTERN.match(name)) and model_class(name) is not None


def check_id(resource_id: str) -> str:
    if not ID_PATTERN.match(resource_id):
        raise InvalidRequest(
            f"'{resource_id[:80]}' is not a valid FHIR id (1-64 of A-Z a-z 0-9 - .)", expression=["id"]
        )
    return resource_id


def require_resource(body: Any, expected_type: str | None = None) -> dict[str, Any]:
    """The body must be a JSON object naming a resource type (of `expected_type` if given)."""
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object holding a FHIR resource")
    resource_type = body.get("resourceType")
    if not isinstance(resource_type, str) or not resource_type:
        raise InvalidRequest("The resource has no resourceType", expression=["resourceType"])
    if expected_type is not None and resource_type != expected_type:
        raise InvalidRequest(
            f"resourceType '{resource_type[:64]}' does not match the URL's type '{expected_type}'",
            expression=["resourceType"],
        )
    return body


def validate(resource: dict[str, Any]) -> None:
    """Raise InvalidResource naming every structural problem (up to a limit)."""
    resource_type = resource["resourceType"]
    model = model_class(resource_type)
    if model is None:
        raise InvalidRequest(f"'{resource_type[:64]}' is not a FHIR R4 resource type", expression=["resourceType"])
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        issues = [_issue(resource_type, err) for err in exc.errors()[:MAX_REPORTED_ISSUES]]
        raise InvalidResource(f"{resource_type} is not valid: {issues[0]['diagnostics']}", issues=issues) from None
    except (ValueError, TypeError) as exc:
        raise InvalidResource(f"{resource_type} is not valid: {str(exc)[:300]}") from None


def _issue(resource_type: str, error: Any) -> dict[str, Any]:
    location = _fhirpath(resource_type, error.get("loc", ()))
    code = "structure" if error.get("type") == "extra_forbidden" else "value"
    if error.get("type") == "missing":
        code = "required"
    message = error.get("msg", "invalid")
    if error.get("type") == "extra_forbidden":
        message = "Unknown element"
    return {
        "severity": "error",
        "code": code,
        "diagnostics": f"{location}: {message}",
        "expression": [location],
    }


def _fhirpath(resource_type: str, loc: tuple[Any, ...]) -> str:
    path = resource_type
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and not part.startswith("function-"):
            path += f".{part}"
    return path

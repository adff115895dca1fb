"""Structural validation of FHIR R4 resources with the fhir.resources R4B models.

Validation runs once per write; reads never build a model (ARCHITECTURE.md §3).
"""

import datetime
import decimal
import re
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.resource import Resource
from pydantic import BaseModel, ValidationError

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
    # `.` and `..` fit the spec's id pattern, but as a path segment they mean something else.
    if not ID_PATTERN.match(resource_id) or resource_id in (".", ".."):
        raise InvalidRequest(
            f"'{resource_id[:80]}' is not a valid FHIR id (1-64 of A-Z a-z 0-9 - .)", expression=["id"]
        )
    return resource_id


@dataclass(frozen=True)
class ElementInfo:
    """What `_summary` and `_elements` need to know about a top-level element."""

    name: str  # the element's name: `effective` for the JSON key `effectiveDateTime`
    summary: bool  # part of the `_summary=true` view
    required: bool  # min cardinality 1 (of one of the choice types, for a required choice)


@cache
def top_level_elements(resource_type: str) -> dict[str, ElementInfo]:
    """JSON key → ElementInfo for a resource type's own elements, from the R4B models."""
    model = model_class(resource_type)
    if model is None:
        return {}
    elements: dict[str, ElementInfo] = {}
    for name, info in model.model_fields.items():
        if name.endswith("__ext") or name == "fhir_comments":
            continue
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        required = info.is_required() or bool(extra.get("element_required") or extra.get("one_of_many_required"))
        key = info.alias or name
        summary = bool(extra.get("summary_element_property"))
        elements[key] = ElementInfo(str(extra.get("one_of_many") or key), summary, required)
    return elements


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
    except (ValueError, TypeError, LookupError) as exc:
        # fhir.resources raises KeyError for a contained resource of an unknown type.
        raise InvalidResource(f"{resource_type} is not valid: {type(exc).__name__} {str(exc)[:300]}") from None
    issues = json_type_issues(resource)
    if issues:
        raise InvalidResource(f"{resource_type} is not valid: {issues[0]['diagnostics']}", issues=issues)


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


# --- JSON types of primitives ----------------------------------------------------------------
#
# The models validate in pydantic's lax mode: `"active": "yes"` becomes True and `"value": "1.5"`
# a Decimal. The server stores the client's JSON, not the model, so such a body would be kept as
# invalid FHIR JSON. This walk (guided by the same models, a few µs) requires each primitive to
# have its JSON type: booleans true/false, integer and decimal numbers, everything else strings.
# It also refuses JSON nulls (allowed only in primitive arrays, where `_x` carries the value) and
# codes outside a required binding whose full list the models carry (`Patient.gender`).

_JSON_KIND_NAMES = {bool: "boolean", int: "number", float: "number", decimal.Decimal: "number"}


def json_type_issues(resource: dict[str, Any]) -> list[dict[str, Any]]:
    issues: list[dict[str, Any]] = []
    _check_object(resource, _fields_of_type(resource["resourceType"]), (resource["resourceType"],), issues)
    return issues[:MAX_REPORTED_ISSUES]


def _check_object(obj: dict[str, Any], fields: dict[str, tuple[str, Any]], path: tuple[Any, ...], issues: list[Any]) -> None:
    # The path is a tuple of parts, joined only when an issue is reported: this walk runs on
    # every write and most resources have no issue.
    for key, value in obj.items():
        spec = fields.get(key)
        if spec is None:
            continue  # `_x` shadows, resourceType, fhir_comments: nothing typed to check
        if type(value) is list:
            for index, item in enumerate(value):
                if item is None and spec[0] == "complex":
                    _report(issues, (*path, key, index), "null is not allowed here")
                else:
                    _check_value(item, spec, (*path, key, index), issues)
        elif value is None:
            _report(issues, (*path, key), "null is not allowed in FHIR JSON; leave the element out")
        else:
            _check_value(value, spec, (*path, key), issues)
        if len(issues) >= MAX_REPORTED_ISSUES:
            return


def _check_value(item: Any, spec: tuple[str, Any], path: tuple[Any, ...], issues: list[Any]) -> None:
    kind, child = spec
    if item is None:
        return  # a null in a primitive array stands for a value that only has an extension
    if kind == "complex":
        if type(item) is dict:
            fields = _fields_of_type(item.get("resourceType", "")) if child is Resource else _fields_of_model(child)
            _check_object(item, fields, path, issues)
        return
    if not _has_json_kind(item, kind):
        _report(issues, path, f"must be a JSON {kind}, not {_json_name(item)}")
    elif child is not None and item not in child:
        _report(issues, path, f"'{str(item)[:40]}' is not one of {', '.join(sorted(child))}", code="code-invalid")


def _report(issues: list[Any], path: tuple[Any, ...], problem: str, *, code: str = "value") -> None:
    where = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(path))
    issues.append({"severity": "error", "code": code, "diagnostics": f"{where}: {problem}", "expression": [where]})


def _has_json_kind(item: Any, kind: str) -> bool:
    if kind == "string":
        return type(item) is str
    if kind == "boolean":
        return type(item) is bool
    if kind == "number":
        return isinstance(item, int | float | decimal.Decimal) and type(item) is not bool
    return True


def _json_name(item: Any) -> str:
    if isinstance(item, bool):
        return "a boolean"
    if isinstance(item, str):
        return "a string"
    if isinstance(item, dict):
        return "an object"
    return "a number"


@cache
def _fields_of_type(resource_type: str) -> dict[str, tuple[str, Any]]:
    model = model_class(resource_type)
    return _fields_of_model(model) if model is not None else {}


@cache
def _fields_of_model(model: type) -> dict[str, tuple[str, Any]]:
    """JSON key → ("boolean" | "number" | "string", allowed codes or None) or ("complex", child model)."""
    fields: dict[str, tuple[str, Any]] = {}
    for name, info in model.model_fields.items():
        if name.endswith("__ext") or name == "fhir_comments":
            continue
        kind, child = _kind_of(info.annotation)
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        codes = extra.get("enum_values")
        # A "+" marks a list the generator cut short: then the codes are not all known here.
        if kind == "string" and codes and "+" not in codes:
            child = frozenset(codes)
        fields[info.alias or name] = (kind, child)
    return fields


def _kind_of(annotation: Any) -> tuple[str, Any]:
    pending = [annotation]
    while pending:
        current = pending.pop()
        if hasattr(current, "get_model_klass"):
            return "complex", current.get_model_klass()
        if isinstance(current, type) and issubclass(current, BaseModel):
            return "complex", current
        if isinstance(current, type) and current in _JSON_KIND_NAMES:
            return _JSON_KIND_NAMES[current], None
        if isinstance(current, type) and issubclass(current, str | bytes | datetime.date | datetime.time):
            return "string", None
        args = typing.get_args(current)
        pending.extend(args[:1] if typing.get_origin(current) is typing.Annotated else args)
    return "any", None

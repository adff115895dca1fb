"""Select the elements a search parameter indexes from a resource's JSON.

Most parameters carry `paths` compiled at generation time and are plain dictionary walks (a few
microseconds). The rest are evaluated with fhirpathpy, each expression compiled once per process.
Returned dicts are the resource's own objects, not copies: callers must not mutate them.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

import fhirpathpy
from fhirpathpy.engine.nodes import ResourceNode
from fhirpathpy.models import models as fhirpath_models

from fhirkit.search.definitions import CompositeComponent, PathAlternative, SearchParamDef, WhereEquals

_log = logging.getLogger(__name__)

CompiledFhirPath = Callable[[dict[str, Any]], list[object]]


def extract_values(resource: dict[str, Any], param: SearchParamDef) -> list[object]:
    if param.paths is not None:
        return walk(resource, param.paths)
    return evaluate_fhirpath(resource, param.expression)


def extract_composite(resource: dict[str, Any], param: SearchParamDef) -> list[tuple[list[object], ...]]:
    """One tuple per element the composite selects, holding each component's values in order."""
    rows: list[tuple[list[object], ...]] = []
    for element in extract_values(resource, param):
        if isinstance(element, dict):
            rows.append(tuple(_component_values(element, component) for component in param.components))
    return rows


def _component_values(element: dict[str, Any], component: CompositeComponent) -> list[object]:
    if component.paths is not None:
        return walk(element, component.paths)
    return evaluate_fhirpath(element, component.expression)


# ---------------------------------------------------------------------------- dictionary walks


def walk(root: dict[str, Any], alternatives: Sequence[PathAlternative]) -> list[object]:
    if len(alternatives) == 1:
        return _walk_one(root, alternatives[0])
    values: list[object] = []
    for alternative in alternatives:
        values += _walk_one(root, alternative)
    # Alternatives come from a FHIRPath union `|`, which removes duplicates.
    return _unique(values)


def _walk_one(root: dict[str, Any], alternative: PathAlternative) -> list[object]:
    current: list[Any] = [root]
    for step in alternative.keys:
        if type(step) is str:
            current = _children(current, step)
        elif type(step) is tuple:
            current = _choice_children(current, step)
        elif type(step) is WhereEquals:
            current = [
                item for item in current if isinstance(item, dict) and item.get(step.key) == step.value
            ]
        else:
            current = current[step : step + 1]  # type: ignore[misc]
        if not current:
            return current
    if alternative.resolve_is is not None:
        return [value for value in current if _points_at(value, alternative.resolve_is)]
    return current


def _children(items: list[Any], key: str) -> list[Any]:
    found: list[Any] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        value = item.get(key)
        if value is None:
            continue
        if type(value) is list:
            # JSON nulls stand for array slots that only carry a primitive's `_key` extension.
            found += [entry for entry in value if entry is not None]
        else:
            found.append(value)
    return found


def _choice_children(items: list[Any], keys: tuple[str, ...]) -> list[Any]:
    found: list[Any] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        for key in keys:
            value = item.get(key)
            if value is None:
                continue
            if type(value) is list:
                found += [entry for entry in value if entry is not None]
            else:
                found.append(value)
            break  # a choice element holds one of its types
    return found


def _unique(values: list[object]) -> list[object]:
    unique: list[object] = []
    for value in values:
        if value not in unique:
            unique.append(value)
    return unique


def _points_at(value: object, resource_type: str) -> bool:
    if not isinstance(value, dict):
        return False
    reference = value.get("reference")
    return isinstance(reference, str) and reference_type(reference) == resource_type


def reference_type(reference: str) -> str | None:
    """The resource type a literal reference points at: `T/id`, `…/T/id`, `…/T/id/_history/v`.

    None for contained (`#id`) and `urn:` references, whose type cannot be read from the string.
    """
    if not reference or reference[0] == "#":
        return None
    parts = reference.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) < 2 or not parts[-1]:
        return None
    candidate = parts[-2]
    is_type_name = candidate.isascii() and candidate.isalpha() and candidate[0].isupper()
    return candidate if is_type_name else None


# ---------------------------------------------------------------------------- FHIRPath fallback


def evaluate_fhirpath(resource: dict[str, Any], expression: str) -> list[object]:
    """Never raises: odd data (or an expression fhirpathpy cannot run) indexes nothing."""
    try:
        return compile_fhirpath(expression)(resource)
    except Exception as exc:
        # The message may quote patient data: log the expression and the error type only.
        _log.debug("FHIRPath %r failed: %s", expression, type(exc).__name__)
        return []


# `X.exists() and <test on X>` (Patient.deceased) is a boolean about X. FHIRPath answers `false`
# when X is absent, which would index "false" for every resource that says nothing about X
# (every patient without a death record would match deceased=false). Without X there is no
# value, so `:missing=true` finds those resources and `:not=true` finds everyone not deceased.
_EXISTS_GUARD = re.compile(r"^([A-Za-z][\w.]*)\.exists\(\) and ")


@functools.cache
def compile_fhirpath(expression: str) -> CompiledFhirPath:
    """Parse once per expression; the returned function raises on evaluation errors."""
    # The user-function table slows every function call in fhirpathpy: pass it only when needed.
    options = _RESOLVE_OPTIONS if "resolve(" in expression else None
    compiled = fhirpathpy.compile(expression, _MODEL, options)
    guard = _EXISTS_GUARD.match(expression)
    subject = fhirpathpy.compile(guard.group(1), _MODEL) if guard else None

    def evaluate(resource: dict[str, Any]) -> list[object]:
        if subject is not None and not any(value is not None for value in subject(resource, {})):
            return []
        return [_plain(value) for value in compiled(resource, {}) if value is not None]

    return evaluate


def _resolve(inputs: list[Any]) -> list[ResourceNode]:
    # Without a store, `resolve()` can only say which type a reference points at; that is all
    # `.where(resolve() is T)` needs.
    nodes: list[ResourceNode] = []
    for value in inputs:
        reference = value.get("reference") if isinstance(value, dict) else None
        target = reference_type(reference) if isinstance(reference, str) else None
        if target is not None:
            nodes.append(ResourceNode.create_node({"resourceType": target}, target))
    return nodes


_MODEL: dict[str, Any] = fhirpath_models["r4"]
_RESOLVE_OPTIONS: dict[str, Any] = {"userInvocationTable": {"resolve": {"fn": _resolve, "arity": {0: []}}}}


def _plain(value: Any) -> object:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, Decimal):
        # fhirpathpy turns JSON decimals into Decimal; the stored JSON parses them as float.
        return float(value)
    if value is None or isinstance(value, str | bool | int | float):
        return value
    return str(value)

"""The official search parameters of the resource types this server holds.

The table is generated from the FHIR core package by `scripts/generate_search_parameters.py`
(never edited by hand) and loaded once per process.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

PARAMETERS_FILE = Path(__file__).with_name("parameters.json")


@dataclass(frozen=True, slots=True)
class WhereEquals:
    """Keep the elements whose single primitive `key` equals `value` (`.where(system='email')`)."""

    key: str
    value: str


# A walk step: a JSON key, the concrete keys of a choice element, an index into the collection
# built so far, or an equality filter.
PathStep = str | tuple[str, ...] | int | WhereEquals


@dataclass(frozen=True, slots=True)
class PathAlternative:
    keys: tuple[PathStep, ...]
    # Keep only references whose `reference` points at this resource type (`.where(resolve() is T)`).
    resolve_is: str | None = None


@dataclass(frozen=True, slots=True)
class CompositeComponent:
    definition: str
    code: str | None
    type: str | None
    expression: str
    # Relative to each element the composite's own paths select; None: FHIRPath at run time.
    paths: tuple[PathAlternative, ...] | None


@dataclass(frozen=True, slots=True)
class SearchParamDef:
    name: str
    resource_type: str
    type: str
    expression: str
    url: str
    paths: tuple[PathAlternative, ...] | None
    targets: tuple[str, ...] = ()
    components: tuple[CompositeComponent, ...] = ()
    multiple_or: bool | None = None
    multiple_and: bool | None = None
    modifiers: tuple[str, ...] = ()
    comparators: tuple[str, ...] = ()


def parameters_for(resource_type: str) -> Mapping[str, SearchParamDef]:
    """Parameters by code; an empty mapping for a type the server does not hold."""
    return _table().get(resource_type, _EMPTY)


def all_resource_types() -> frozenset[str]:
    return frozenset(_table())


def source_package() -> str:
    return str(_raw()["source"]["package"])


_EMPTY: Mapping[str, SearchParamDef] = MappingProxyType({})


@functools.cache
def _raw() -> dict[str, Any]:
    return json.loads(PARAMETERS_FILE.read_bytes())


@functools.cache
def _table() -> Mapping[str, Mapping[str, SearchParamDef]]:
    resources: dict[str, dict[str, Any]] = _raw()["resources"]
    return MappingProxyType(
        {
            resource_type: MappingProxyType(
                {code: _param(resource_type, code, record) for code, record in params.items()}
            )
            for resource_type, params in resources.items()
        }
    )


def _param(resource_type: str, code: str, record: dict[str, Any]) -> SearchParamDef:
    return SearchParamDef(
        name=code,
        resource_type=resource_type,
        type=record["type"],
        expression=record["expression"],
        url=record["url"],
        paths=_paths(record["paths"]),
        targets=tuple(record.get("target", ())),
        components=tuple(_component(c) for c in record.get("components", ())),
        multiple_or=record.get("multipleOr"),
        multiple_and=record.get("multipleAnd"),
        modifiers=tuple(record.get("modifier", ())),
        comparators=tuple(record.get("comparator", ())),
    )


def _component(record: dict[str, Any]) -> CompositeComponent:
    return CompositeComponent(
        definition=record["definition"],
        code=record.get("code"),
        type=record.get("type"),
        expression=record["expression"],
        paths=_paths(record["paths"]),
    )


def _paths(raw: list[Any] | None) -> tuple[PathAlternative, ...] | None:
    if raw is None:
        return None
    return tuple(_alternative(alternative) for alternative in raw)


def _alternative(raw: list[Any] | dict[str, Any]) -> PathAlternative:
    if isinstance(raw, dict):
        return PathAlternative(_steps(raw["keys"]), raw.get("resolve_is"))
    return PathAlternative(_steps(raw))


def _steps(raw: list[Any]) -> tuple[PathStep, ...]:
    return tuple(_step(step) for step in raw)


def _step(raw: Any) -> PathStep:
    if isinstance(raw, list):
        return tuple(raw)
    if isinstance(raw, dict):
        ((key, value),) = raw["where"].items()
        return WhereEquals(key, value)
    return raw

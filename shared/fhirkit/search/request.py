"""Query string → SearchRequest. Pure: no SQL, no I/O.

Every parameter name is checked against the official definitions of the resource type; an
unknown one is an error unless the client asked for `Prefer: handling=lenient`, because silently
ignoring a misspelled filter returns the wrong patients' data.
"""

import re
from dataclasses import dataclass, field
from typing import Any

from fhirkit.errors import InvalidRequest, NotSupported, UnknownSearchParameter
from fhirkit.resources import is_resource_type
from fhirkit.search import definitions
from fhirkit.search.values import date_range, decimal_range, natural

PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
RESULT_PARAMETERS = {
    "_count", "_sort", "_include", "_revinclude", "_total", "_summary", "_elements",
    "_format", "_pretty", "_cursor", "_page_dir", "_totalMethod",
}
DEFAULT_COUNT = 20
MAX_COUNT = 1000
MAX_CHAIN_DEPTH = 3
ANY = "*any*"  # a token system or code that matches anything
MODIFIERS = {
    "token": {"not", "missing", "text", "of-type"},
    "string": {"exact", "contains", "missing"},
    "reference": {"missing", "identifier", "above", "below"},
    "date": {"missing"},
    "number": {"missing"},
    "quantity": {"missing"},
    "uri": {"missing", "above", "below"},
}
SUPPORTED_MODIFIERS = {
    "token": {"not", "missing"},
    "string": {"exact", "contains", "missing"},
    "reference": {"missing", "above", "below"},
    "date": {"missing"},
    "number": {"missing"},
    "quantity": {"missing"},
    "uri": {"missing", "above", "below"},
}


@dataclass(frozen=True)
class TokenValue:
    system: str | None  # None: the element must have no system; ANY: any system
    code: str | None  # ANY: any code


@dataclass(frozen=True)
class ReferenceValue:
    target_type: str | None
    target_id: str | None
    url: str | None


@dataclass(frozen=True)
class RangeValue:
    prefix: str
    value: float | None
    low: float | int
    high: float | int
    system: str | None = None
    code: str | None = None


@dataclass(frozen=True)
class Filter:
    resource_type: str
    name: str
    kind: str
    modifier: str | None
    values: tuple[Any, ...]  # ORed
    targets: tuple[str, ...] = ()
    chain: "Filter | None" = None  # `subject:Patient.name=x`: filter on the referenced resources
    chain_type: str | None = None


@dataclass(frozen=True)
class HasFilter:
    source_type: str  # the type that points at us (`Observation` in `_has:Observation:patient:code=x`)
    reference_param: str
    inner: "Filter | HasFilter"


@dataclass(frozen=True)
class Include:
    source_type: str
    param: str
    target_type: str | None
    iterate: bool
    reverse: bool


@dataclass(frozen=True)
class SortKey:
    name: str
    kind: str
    descending: bool


@dataclass
class SearchRequest:
    resource_type: str
    filters: list[Filter | HasFilter] = field(default_factory=list)
    sort: list[SortKey] = field(default_factory=list)
    count: int = DEFAULT_COUNT
    cursor: str | None = None
    total: str = "accurate"
    summary: str | None = None
    elements: tuple[str, ...] = ()
    includes: list[Include] = field(default_factory=list)
    revincludes: list[Include] = field(default_factory=list)
    lenient_dropped: list[str] = field(default_factory=list)


def split_values(raw: str) -> list[str]:
    """Split an OR list on unescaped commas and unescape `\\,` `\\|` `\\$` `\\\\`."""
    parts = re.split(r"(?<!\\),", raw)
    return [re.sub(r"\\([,|$\\])", r"\1", part) for part in parts]


def parse_search(
    resource_type: str, params: list[tuple[str, str]], *, lenient: bool = False
) -> SearchRequest:
    request = SearchRequest(resource_type=resource_type)
    refuse_nul(params)
    for name, value in params:
        if name.partition(":")[0] in ("_include", "_revinclude"):
            include = parse_include(resource_type, name, value)
            (request.revincludes if include.reverse else request.includes).append(include)
            continue
        if name in RESULT_PARAMETERS:
            _apply_result_parameter(request, name, value, lenient)
            continue
        try:
            request.filters.append(parse_filter(resource_type, name, value))
        except UnknownSearchParameter:
            if not lenient:
                raise
            request.lenient_dropped.append(name)
    return request


def refuse_nul(params: list[tuple[str, str]]) -> None:
    """U+0000 in a parameter name or value can match nothing, and PostgreSQL text refuses it."""
    for name, value in params:
        if "\x00" in name or "\x00" in value:
            raise InvalidRequest(f"The parameter '{name.replace(chr(0), '')[:64]}' contains U+0000 (NUL)")


def parse_filter(resource_type: str, name: str, value: str, depth: int = 0) -> Filter | HasFilter:
    if name.startswith("_has:"):
        return _parse_has(resource_type, name, value, depth)
    if depth > MAX_CHAIN_DEPTH:
        raise InvalidRequest(f"Chains and _has may nest at most {MAX_CHAIN_DEPTH} levels")
    head, dot, rest = name.partition(".")
    base, _, modifier = head.partition(":")
    param = _lookup(resource_type, base)
    if dot:
        return _parse_chain(resource_type, param, modifier or None, rest, value, depth)
    mod = modifier or None
    if mod is not None and mod not in MODIFIERS.get(param.type, set()) and not (
        param.type == "reference" and is_resource_type(mod)
    ):
        raise InvalidRequest(f"Modifier ':{mod}' is not valid for {param.type} parameter '{base}'")
    if mod is not None and mod not in SUPPORTED_MODIFIERS.get(param.type, set()) and not (
        param.type == "reference" and is_resource_type(mod)
    ):
        raise NotSupported(f"Modifier ':{mod}' on '{base}' is not supported by this server")
    targets = tuple(param.targets)
    if param.type == "reference" and mod and is_resource_type(mod):
        targets, mod = (mod,), None
    if mod == "missing":
        if value not in ("true", "false"):
            raise InvalidRequest(f"':missing' takes true or false, not '{value[:40]}'")
        return Filter(resource_type, base, param.type, "missing", (value == "true",), targets)
    values = tuple(_parse_value(param.type, base, v, targets) for v in split_values(value))
    if param.type == "reference" and mod in ("above", "below"):
        values = tuple(_hierarchy_value(resource_type, param, mod, v) for v in values)
    return Filter(resource_type, base, param.type, mod, values, targets)


def _hierarchy_value(resource_type: str, param: Any, modifier: str, value: ReferenceValue) -> ReferenceValue:
    # A reference hierarchy is walked along the parameter itself, so it must point at the
    # searched type (Organization.partOf, Location.partOf, Encounter.partOf, ...).
    target_type = value.target_type or resource_type
    if resource_type not in param.targets or target_type != resource_type or not value.target_id:
        raise NotSupported(
            f"':{modifier}' on '{param.name}' is supported only along a hierarchy of {resource_type} "
            f"(e.g. {resource_type}?{param.name}:{modifier}={resource_type}/id)"
        )
    return ReferenceValue(resource_type, value.target_id, value.url)


def _lookup(resource_type: str, name: str) -> definitions.SearchParamDef:
    param = definitions.parameters_for(resource_type).get(name)
    if param is None:
        raise UnknownSearchParameter(
            f"Unknown search parameter '{name[:64]}' for {resource_type}", expression=[name[:64]]
        )
    if param.type in ("composite", "special"):
        raise NotSupported(f"Search parameter '{name}' ({param.type}) is not supported by this server")
    return param


def _parse_chain(
    resource_type: str, param: Any, modifier: str | None, rest: str, value: str, depth: int
) -> Filter:
    if param.type != "reference":
        raise InvalidRequest(f"'{param.name}' is not a reference parameter and cannot be chained")
    targets = [modifier] if modifier else list(param.targets)
    next_name = rest.partition(".")[0].partition(":")[0]
    candidates = [t for t in targets if next_name in definitions.parameters_for(t) or next_name.startswith("_has")]
    if not candidates:
        raise UnknownSearchParameter(
            f"None of the types '{param.name}' can point at ({', '.join(targets)}) has parameter '{next_name}'"
        )
    if len(candidates) > 1:
        raise InvalidRequest(
            f"Chain '{param.name}.{next_name}' is ambiguous between {', '.join(candidates)}: "
            f"name the type, e.g. '{param.name}:{candidates[0]}.{next_name}'"
        )
    target = candidates[0]
    inner = parse_filter(target, rest, value, depth + 1)
    if isinstance(inner, HasFilter):
        raise NotSupported("_has inside a chain is not supported")
    return Filter(resource_type, param.name, "reference", None, (), (target,), chain=inner, chain_type=target)


def _parse_has(resource_type: str, name: str, value: str, depth: int) -> HasFilter:
    parts = name.split(":", 3)
    if len(parts) != 4 or not all(parts[1:]):
        raise InvalidRequest(f"'{name[:80]}' is not of the form _has:Type:reference:parameter")
    _, source_type, reference_param, inner_name = parts
    if not is_resource_type(source_type):
        raise InvalidRequest(f"_has names unknown resource type '{source_type[:64]}'")
    ref = _lookup(source_type, reference_param)
    if ref.type != "reference":
        raise InvalidRequest(f"'{reference_param}' of {source_type} is not a reference parameter")
    inner = parse_filter(source_type, inner_name, value, depth + 1)
    return HasFilter(source_type, reference_param, inner)


def _parse_value(kind: str, name: str, raw: str, targets: tuple[str, ...]) -> Any:
    if kind == "token":
        return _token(raw)
    if kind == "reference":
        return _reference(raw, targets)
    if kind in ("date", "number", "quantity"):
        return _range(kind, name, raw)
    if raw == "":
        raise InvalidRequest(f"Parameter '{name}' has an empty value")
    return raw


def _token(raw: str) -> TokenValue:
    if "|" not in raw:
        return TokenValue(ANY, raw or ANY)
    system, code = re.split(r"(?<!\\)\|", raw, maxsplit=1)
    return TokenValue(system or None, code or ANY)


def _reference(raw: str, targets: tuple[str, ...]) -> ReferenceValue:
    if raw.startswith(("http://", "https://", "urn:")):
        parts = [p for p in raw.split("|")[0].split("/") if p]
        if len(parts) >= 2 and is_resource_type(parts[-2]):
            return ReferenceValue(parts[-2], parts[-1], raw)
        return ReferenceValue(None, None, raw)
    if "/" in raw:
        target_type, _, target_id = raw.partition("/")
        target_id = target_id.split("/_history")[0]
        if not is_resource_type(target_type) or not target_id:
            raise InvalidRequest(f"'{raw[:80]}' is not a valid reference (Type/id)")
        return ReferenceValue(target_type, target_id, None)
    if not raw:
        raise InvalidRequest("A reference search value is empty")
    return ReferenceValue(None, raw, None)


def _range(kind: str, name: str, raw: str) -> RangeValue:
    prefix = raw[:2] if raw[:2] in PREFIXES and not raw[:2].isdigit() else "eq"
    body = raw[2:] if raw[:2] == prefix else raw
    if kind == "date":
        bounds = date_range(body)
        if bounds is None:
            raise InvalidRequest(f"'{raw[:60]}' is not a valid date for parameter '{name}'")
        return RangeValue(prefix, None, bounds[0], bounds[1])
    number_text, system, code = body, None, None
    if kind == "quantity":
        pieces = re.split(r"(?<!\\)\|", body)
        number_text = pieces[0]
        system = pieces[1] or None if len(pieces) > 1 else None
        code = pieces[2] or None if len(pieces) > 2 else None
    parsed = decimal_range(number_text)
    if parsed is None:
        raise InvalidRequest(f"'{raw[:60]}' is not a valid number for parameter '{name}'")
    return RangeValue(prefix, parsed[0], parsed[1], parsed[2], system, code)


def _apply_result_parameter(request: SearchRequest, name: str, value: str, lenient: bool) -> None:
    if name == "_count":
        request.count = parse_count(value)
    elif name == "_sort":
        request.sort = [_sort_key(request.resource_type, key) for key in value.split(",") if key]
    elif name == "_total":
        if value not in ("none", "estimate", "accurate"):
            raise InvalidRequest("_total must be none, estimate or accurate")
        request.total = value
    elif name == "_totalMethod":  # fhirpy's spelling of _total
        request.total = "accurate" if value == "count" else "none"
    elif name == "_summary":
        if value not in ("true", "false", "count", "text", "data"):
            raise InvalidRequest("_summary must be true, false, count, text or data")
        request.summary = None if value == "false" else value
    elif name == "_elements":
        request.elements = tuple(e.strip() for e in value.split(",") if e.strip())
    elif name == "_cursor":
        request.cursor = value


def parse_count(value: str) -> int:
    """`_count`: ASCII digits, clamped to MAX_COUNT (however many digits are sent)."""
    if not (value.isascii() and value.isdigit()):
        raise InvalidRequest(f"_count must be a non-negative integer, not '{value[:20]}'")
    number = natural(value)
    return MAX_COUNT if number is None else min(number, MAX_COUNT)


def _sort_key(resource_type: str, key: str) -> SortKey:
    descending = key.startswith("-")
    name = key.lstrip("-")
    if name in ("_id", "_lastUpdated"):
        return SortKey(name, "special", descending)
    param = definitions.parameters_for(resource_type).get(name)
    if param is None or param.type in ("composite", "special"):
        raise InvalidRequest(f"Cannot sort {resource_type} by '{name[:64]}'")
    return SortKey(name, param.type, descending)


def parse_include(resource_type: str, name: str, value: str) -> Include:
    """`_include[:iterate]=Source:param[:Target]`; R3's `:recurse` and a trailing `:iterate` on
    the value (as some clients write it) mean the same."""
    base, _, modifier = name.partition(":")
    if modifier not in ("", "iterate", "recurse"):
        raise InvalidRequest(f"'{name[:40]}' is not a valid modifier of {base} (only :iterate)")
    reverse = base == "_revinclude"
    iterate = modifier != ""
    if value.endswith((":iterate", ":recurse")):
        iterate, value = True, value.rsplit(":", 1)[0]
    if value == "*":
        raise NotSupported(f"{name}=* is not supported: name the parameters to include")
    parts = value.split(":")
    if len(parts) not in (2, 3):
        raise InvalidRequest(f"{name} must be Type:parameter[:targetType], not '{value[:80]}'")
    source_type, param_name = parts[0], parts[1]
    target_type = parts[2] if len(parts) == 3 else None
    if not is_resource_type(source_type):
        raise InvalidRequest(f"{name} names unknown resource type '{source_type[:64]}'")
    if not iterate and not reverse and source_type != resource_type:
        raise InvalidRequest(f"_include must start with the searched type {resource_type} (or use :iterate)")
    param = definitions.parameters_for(source_type).get(param_name)
    if param is None or param.type != "reference":
        raise InvalidRequest(f"'{param_name[:64]}' is not a reference parameter of {source_type}")
    if target_type is not None and not is_resource_type(target_type):
        raise InvalidRequest(f"{name} names unknown target type '{target_type[:64]}'")
    return Include(source_type, param_name, target_type, iterate, reverse)

"""Resource → search index rows, one converter per search-parameter type.

The extracted elements come from `fhirkit.search.extract`; each converter understands the FHIR
data types a parameter of its kind may select (a token may be a CodeableConcept, Coding,
Identifier, ContactPoint, code or boolean; a date a date, Period or Timing; and so on).
"""

import functools
from collections.abc import Callable, Iterator
from typing import Any

from fhirkit.search import definitions, extract
from fhirkit.search.values import date_range, decimal_range, normalize_string

Row = dict[str, Any]
IndexRows = dict[str, list[Row]]

# `_id` and `_lastUpdated` are columns of fhir_resource; composite and special are not indexed.
UNINDEXED = {"_id", "_lastUpdated"}
INDEXED_TYPES = {"token", "string", "reference", "date", "number", "quantity", "uri"}


def index_rows(resource: dict[str, Any], kinds: frozenset[str] | set[str] = INDEXED_TYPES) -> IndexRows:
    """The index rows of `resource` by parameter type; `kinds` limits them to some types (the
    date index alone, when a migration recomputes it)."""
    resource_type = resource["resourceType"]
    rows: IndexRows = {kind: [] for kind in kinds}
    present = resource.keys()
    for name, param, converter, roots in _indexers(resource_type, frozenset(kinds)):
        if roots is not None and present.isdisjoint(roots):
            continue  # nothing it selects is in the resource (most of a type's parameters)
        seen: set[tuple[Any, ...]] = set()
        for element in extract.extract_values(resource, param):
            for values in converter(extension_value(element), param):
                key = tuple(values.values())
                if key in seen:
                    continue
                seen.add(key)
                rows[param.type].append({"resource_type": resource_type, "param": name, **values})
    return rows


Indexer = tuple[str, definitions.SearchParamDef, Callable[[Any, Any], Iterator[Row]], frozenset[str] | None]


@functools.cache
def _indexers(resource_type: str, kinds: frozenset[str]) -> tuple[Indexer, ...]:
    """The type's indexed parameters of those kinds, each with its converter and the top-level
    keys its paths start from (None: it may select from anywhere, a FHIRPath expression)."""
    return tuple((name, param, _CONVERTERS[param.type], _roots(param))
                 for name, param in definitions.parameters_for(resource_type).items()
                 if name not in UNINDEXED and param.type in kinds)


def _roots(param: definitions.SearchParamDef) -> frozenset[str] | None:
    if param.paths is None:
        return None
    roots: set[str] = set()
    for alternative in param.paths:
        first = alternative.keys[0] if alternative.keys else None
        if isinstance(first, str):
            roots.add(first)
        elif isinstance(first, tuple):  # a choice element: any of its concrete keys
            roots.update(first)
        else:  # a path selecting the resource itself: always walked
            return None
    return frozenset(roots)


def extension_value(element: Any) -> Any:
    """An Extension's `value[x]`, else the element itself.

    Parameters defined on extensions (`Observation.extension('…geneticsGene')`, the genetics
    parameters) select Extension elements; what they index is the value the extension carries.
    Identifier and Quantity have a plain `value` key and no `url`, so they are never mistaken
    for an Extension.
    """
    if type(element) is dict and "url" in element:
        for key, value in element.items():
            if key.startswith("value") and key[5:6].isupper():
                return value
    return element


def _clip(text: Any, size: int = 255) -> str | None:
    if text is None:
        return None
    return str(text)[:size]


def _tokens(element: Any, param: Any) -> Iterator[Row]:
    if isinstance(element, bool):
        yield {"system": None, "code": "true" if element else "false"}
    elif isinstance(element, str | int | float):
        yield {"system": None, "code": _clip(element)}
    elif isinstance(element, dict):
        if "coding" in element or ("text" in element and "code" not in element and "value" not in element):
            for coding in element.get("coding") or ():  # CodeableConcept
                if isinstance(coding, dict) and (coding.get("code") or coding.get("system")):
                    yield {"system": _clip(coding.get("system")), "code": _clip(coding.get("code"))}
        elif "value" in element:
            # Identifier (system|value) and ContactPoint (phone|value) read the same way.
            yield {"system": _clip(element.get("system")), "code": _clip(element.get("value"))}
        elif "code" in element or "system" in element:
            yield {"system": _clip(element.get("system")), "code": _clip(element.get("code"))}  # Coding


def _strings(element: Any, param: Any) -> Iterator[Row]:
    if isinstance(element, str):
        yield {"norm": normalize_string(element), "exact": _clip(element)}
    elif isinstance(element, dict):
        for part in _string_parts(element):
            yield {"norm": normalize_string(part), "exact": _clip(part)}


def _string_parts(element: dict[str, Any]) -> Iterator[str]:
    # HumanName and Address: every textual part is searchable, plus the whole text.
    for key in ("text", "family", "city", "district", "state", "postalCode", "country"):
        value = element.get(key)
        if isinstance(value, str):
            yield value
    for key in ("given", "prefix", "suffix", "line"):
        for value in element.get(key) or ():
            if isinstance(value, str):
                yield value
    if isinstance(element.get("family"), str) and element.get("given"):
        # Chinese names are written family-first with no space: 张伟 must match name=张伟.
        given = "".join(v for v in element["given"] if isinstance(v, str))
        yield element["family"] + given


def _references(element: Any, param: Any) -> Iterator[Row]:
    if isinstance(element, str):  # canonical or uri
        yield {**split_reference(element), "url": _clip(element, 512)}
    elif isinstance(element, dict):
        reference = element.get("reference")
        if isinstance(reference, str) and not reference.startswith("#"):
            yield {**split_reference(reference), "url": _clip(reference, 512)}


def split_reference(reference: str) -> dict[str, str | None]:
    """`Patient/1`, `Patient/1/_history/2` and `http://x/fhir/Patient/1` → type and id."""
    path = reference.split("|", 1)[0]
    parts = [p for p in path.split("/") if p]
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2 and parts[-2][:1].isupper():
        return {"target_type": parts[-2][:64], "target_id": parts[-1][:128]}
    return {"target_type": None, "target_id": None}


def _dates(element: Any, param: Any) -> Iterator[Row]:
    if isinstance(element, str):
        bounds = date_range(element)
        if bounds:
            yield {"low": bounds[0], "high": bounds[1]}
    elif isinstance(element, dict):
        if "start" in element or "end" in element:  # Period: an open end is unbounded
            start = date_range(element["start"]) if isinstance(element.get("start"), str) else None
            end = date_range(element["end"]) if isinstance(element.get("end"), str) else None
            if start or end:
                yield {"low": start[0] if start else -(2**62), "high": end[1] if end else 2**62}
        for event in element.get("event") or ():  # Timing
            yield from _dates(event, param)


def _numbers(element: Any, param: Any) -> Iterator[Row]:
    if isinstance(element, bool | str | dict | list) or element is None:
        return
    try:
        yield {"value": float(element)}  # int, float or a precise Decimal
    except (TypeError, ValueError):
        return


def _quantities(element: Any, param: Any) -> Iterator[Row]:
    if not isinstance(element, dict):
        return
    value = element.get("value")
    if value is None or isinstance(value, bool):
        return
    try:
        number = float(value)
    except (TypeError, ValueError):
        return
    yield {
        "value": number,
        "system": _clip(element.get("system")),
        "code": _clip(element.get("code"), 64),
        "unit": _clip(element.get("unit") or element.get("currency"), 64),
    }


def _uris(element: Any, param: Any) -> Iterator[Row]:
    if isinstance(element, str):
        yield {"value": element[:512]}


_CONVERTERS: dict[str, Callable[[Any, Any], Iterator[Row]]] = {
    "token": _tokens,
    "string": _strings,
    "reference": _references,
    "date": _dates,
    "number": _numbers,
    "quantity": _quantities,
    "uri": _uris,
}

# Exposed for query parsing, which needs the same reading of a search value as the indexer.
__all__ = ["date_range", "decimal_range", "index_rows", "split_reference"]

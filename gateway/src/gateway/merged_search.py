"""A search of a type several services hold (ServiceRequest, Task, Provenance) when nothing in
the query names the owner: every owner is asked, and their pages are merged into one Bundle,
sorted by the same keys, with a `next` link that resumes each owner where the merge left it.

Each owner sorts its own rows; the merge compares the sort values taken from the resources
themselves (default `_lastUpdated`, then `_id`, so the order is the same whoever holds a row).
The cursor records, per owner, the owner's page cursor and how many rows of that page the
merged pages have already used.
"""

import base64
import heapq
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

import orjson

from fhirkit import jsonio
from fhirkit.api.responses import bundle_bytes
from fhirkit.errors import InvalidRequest, UpstreamUnavailable
from fhirkit.search import definitions, extract
from fhirkit.search.request import DEFAULT_COUNT, MAX_COUNT
from fhirkit.search.values import date_range, normalize_string
from fhirkit.store.query import ORDERED_CODES

CURSOR = "_merged"
Fetch = Callable[[str, list[tuple[str, str]]], Awaitable[tuple[int, bytes]]]


def _sort_keys(resource_type: str, params: list[tuple[str, str]]) -> list[tuple[str, bool]]:
    given = [value for key, value in params if key == "_sort"]
    keys = [(k.lstrip("-"), k.startswith("-")) for k in ",".join(given).split(",") if k] or [("_lastUpdated", False)]
    return [*keys, ("_id", False)]


def _value(resource: dict[str, Any], name: str, descending: bool) -> Any:
    if name == "_id":
        return resource.get("id")
    if name == "_lastUpdated":
        bounds = date_range((resource.get("meta") or {}).get("lastUpdated", ""))
        return bounds[0] if bounds else None
    param = definitions.parameters_for(resource.get("resourceType", "")).get(name)
    if param is None:
        return None
    values = [_comparable(param.type, v) for v in extract.extract_values(resource, param)]
    if name in ORDERED_CODES:  # the same clinical order the services sort by (stat before urgent)
        values = [ORDERED_CODES[name].index(v) if v in ORDERED_CODES[name] else None for v in values]
    values = [v for v in values if v is not None]
    if not values:
        return None
    return max(values) if descending else min(values)  # as the services sort several values


def _comparable(kind: str, value: Any) -> Any:
    if kind == "date":
        text = value if isinstance(value, str) else (value or {}).get("start") if isinstance(value, dict) else None
        bounds = date_range(text) if isinstance(text, str) else None
        return bounds[0] if bounds else None
    if kind == "string" and isinstance(value, str):
        return normalize_string(value)
    if kind == "token":
        if isinstance(value, dict):
            coding = (value.get("coding") or [value])[0]
            return coding.get("code") or coding.get("value")
        return str(value)
    if kind in ("number", "quantity"):
        number = value.get("value") if isinstance(value, dict) else value
        return float(number) if isinstance(number, int | float) else None
    if kind == "reference" and isinstance(value, dict):
        return value.get("reference")
    return value if isinstance(value, str | int | float) else None


class _Descending:
    """Inverts the order of a value inside a sort tuple."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __lt__(self, other: "_Descending") -> bool:
        return bool(other.value < self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Descending) and self.value == other.value


def _order(resource: dict[str, Any], keys: list[tuple[str, bool]]) -> tuple[Any, ...]:
    parts: list[Any] = []
    for name, descending in keys:
        value = _value(resource, name, descending)
        parts.append(value is None)  # rows without a value come last, in either direction
        parts.append(_Descending(value) if descending and value is not None else (value if value is not None else 0))
    return tuple(parts)


def _decode(text: str | None, owners: list[str]) -> dict[str, dict[str, Any]]:
    if not text:
        return {owner: {"cursor": None, "skip": 0, "done": False, "total": 0} for owner in owners}
    try:
        state = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        assert isinstance(state, dict) and set(state) == set(owners)
        return state
    except (ValueError, AssertionError, orjson.JSONDecodeError):
        raise InvalidRequest("The paging cursor is not valid; start the search again") from None


def _encode(state: dict[str, dict[str, Any]]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(state)).decode("ascii").rstrip("=")


async def merged_search(
    resource_type: str, owners: list[str], params: list[tuple[str, str]], fetch: Fetch, base: str
) -> tuple[int, bytes]:
    """(status, body): the merged Bundle, or the first owner's refusal as it gave it."""
    count_text = next((v for k, v in params if k == "_count"), str(DEFAULT_COUNT))
    if not count_text.isdigit():
        raise InvalidRequest(f"_count must be a non-negative integer, not '{count_text[:20]}'")
    count = min(int(count_text), MAX_COUNT)
    state = _decode(next((v for k, v in params if k == CURSOR), None), owners)
    keys = _sort_keys(resource_type, params)
    plain = [(k, v) for k, v in params if k not in (CURSOR, "_count", "_cursor", "_sort")]
    sort = [("_sort", ",".join(("-" if d else "") + n for n, d in keys))]
    rows: dict[str, list[dict[str, Any]]] = {}
    included: list[dict[str, Any]] = []
    outcomes: list[dict[str, Any]] = []  # warnings the owners added (e.g. an include they cannot follow)
    next_cursors: dict[str, str | None] = {}
    for owner in owners:
        owner_state = state[owner]
        if owner_state["done"]:
            continue
        query = [*plain, *sort, ("_count", str(owner_state["skip"] + count))]
        if owner_state["cursor"]:
            query.append(("_cursor", owner_state["cursor"]))
        status, body = await fetch(owner, query)
        if status != 200:
            if status >= 500:
                raise UpstreamUnavailable(f"The {owner} service could not answer its part of the search")
            return status, body
        bundle = jsonio.loads(body)  # keeps decimals as written
        owner_state["total"] = bundle.get("total") or 0  # owners already used up keep their last count
        entries = bundle.get("entry") or []
        rows[owner] = [e["resource"] for e in entries if _mode(e) == "match"]
        included += [e["resource"] for e in entries if _mode(e) == "include"]
        outcomes += [e for e in entries if _mode(e) == "outcome" and e not in outcomes]
        next_cursors[owner] = _cursor_of(bundle)
    page = _merge(rows, state, keys, count)
    for owner, used in page.used.items():
        _advance(state[owner], used, len(rows[owner]), next_cursors.get(owner))
    links = [("self", _url(base, resource_type, params))]
    if any(not s["done"] for s in state.values()):
        links.append(("next", _url(base, resource_type, [*[(k, v) for k, v in params if k != CURSOR],
                                                            (CURSOR, _encode(state))])))
    entries = [_entry(base, r, "match") for r in page.resources] + [_entry(base, r, "include") for r in included]
    entries += [jsonio.dumps(outcome) for outcome in outcomes]
    total = sum(s.get("total", 0) for s in state.values())
    return 200, bundle_bytes("searchset", entries, total=total, links=links)


class _Page:
    def __init__(self) -> None:
        self.resources: list[dict[str, Any]] = []
        self.used: dict[str, int] = {}


def _merge(rows: dict[str, list[dict[str, Any]]], state: dict[str, Any], keys: list[tuple[str, bool]],
           count: int) -> _Page:
    page = _Page()
    heap: list[tuple[tuple[Any, ...], str, int]] = []
    for owner, resources in rows.items():
        page.used[owner] = 0
        start = state[owner]["skip"]
        if start < len(resources):
            heapq.heappush(heap, (_order(resources[start], keys), owner, start))
    while heap and len(page.resources) < count:
        _, owner, index = heapq.heappop(heap)
        page.resources.append(rows[owner][index])
        page.used[owner] += 1
        if index + 1 < len(rows[owner]):
            heapq.heappush(heap, (_order(rows[owner][index + 1], keys), owner, index + 1))
    return page


def _advance(owner_state: dict[str, Any], used: int, fetched: int, next_cursor: str | None) -> None:
    owner_state["skip"] += used
    if owner_state["skip"] >= fetched:  # this page of the owner is used up
        owner_state.update(cursor=next_cursor, skip=0, done=next_cursor is None)


def _mode(entry: dict[str, Any]) -> str:
    return (entry.get("search") or {}).get("mode") or "match"


def _cursor_of(bundle: dict[str, Any]) -> str | None:
    from urllib.parse import parse_qs, urlsplit

    for link in bundle.get("link") or []:
        if link.get("relation") == "next":
            return (parse_qs(urlsplit(link["url"]).query).get("_cursor") or [None])[0]
    return None


def _url(base: str, resource_type: str, params: list[tuple[str, str]]) -> str:
    query = urlencode(params)
    return f"{base}/{resource_type}" + (f"?{query}" if query else "")


def _entry(base: str, resource: dict[str, Any], mode: str) -> bytes:
    return jsonio.dumps({"fullUrl": f"{base}/{resource['resourceType']}/{resource['id']}", "resource": resource,
                         "search": {"mode": mode}})

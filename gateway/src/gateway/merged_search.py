"""A search of a type several services hold (ServiceRequest, Task, Provenance) when nothing in
the query names the owner: every owner is asked, and their pages are merged into one Bundle,
sorted by the same keys, with `next` and `previous` links that page on from where the merge
stands.

Each owner sorts its own rows; the merge compares the sort values taken from the resources
themselves (default `_lastUpdated`, then `_id`, so the order is the same whoever holds a row).
The `_merged` cursor records the page's direction and, per owner, where the page boundary falls
in the owner's rows as one of the owner's own keyset cursors (or "before the first" / "after the
last"). So merged pages are as stable while data change as the owners' own pages: a boundary is a
position between two rows, never a count of rows. When a page uses only part of the rows an owner
sent, the owner is asked once more for exactly that many rows, to learn its cursor after them. A
backward page reads each owner backwards from the boundary (an owner's `next` cursor turned into
a `previous` one, `fhirkit.store.query.Cursor.turned`) and merges latest first.
"""

import base64
import heapq
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import orjson

from fhirkit import jsonio
from fhirkit.api.responses import bundle_bytes
from fhirkit.errors import InvalidRequest, UpstreamUnavailable
from fhirkit.search import definitions, extract
from fhirkit.search.request import DEFAULT_COUNT, MAX_COUNT
from fhirkit.search.values import date_range, normalize_string
from fhirkit.store.query import ORDERED_CODES, Cursor

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


class _Reversed:
    """Inverts the order of a whole sort tuple: a backward page merges the rows latest first."""

    def __init__(self, order: tuple[Any, ...]) -> None:
        self.order = order

    def __lt__(self, other: "_Reversed") -> bool:
        return bool(other.order < self.order)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Reversed) and self.order == other.order


# Where an owner stands in its own sorted rows: before the first, after the last, or at a page
# boundary given by one of its own paging cursors (which say between which two rows they stand).
START, END = "start", "end"


@dataclass
class _Owner:
    position: str  # START, END or the owner's `_cursor`
    total: int = 0


@dataclass
class _State:
    """What a `_merged` cursor carries: the direction of the page it asks for and each owner's
    position at the page boundary it starts from."""

    backward: bool
    owners: dict[str, _Owner]

    def encode(self) -> str:
        data = {"b": self.backward, "o": {name: [o.position, o.total] for name, o in self.owners.items()}}
        return base64.urlsafe_b64encode(orjson.dumps(data)).decode("ascii").rstrip("=")

    @staticmethod
    def decode(text: str | None, owners: list[str]) -> "_State":
        if not text:
            return _State(False, {owner: _Owner(START) for owner in owners})
        try:
            data = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            assert isinstance(data, dict) and isinstance(data["o"], dict) and set(data["o"]) == set(owners)
            parsed = {name: _Owner(str(p), int(t)) for name, (p, t) in data["o"].items()}
            return _State(bool(data["b"]), parsed)
        except (ValueError, AssertionError, KeyError, TypeError, orjson.JSONDecodeError):
            raise InvalidRequest("The paging cursor is not valid; start the search again") from None


@dataclass
class _Answer:
    """One owner's rows for a page, in the page's direction (latest first when backward)."""

    rows: list[dict[str, Any]]
    onward: str | None  # the owner's cursor past its last row in that direction, if it has more


class _MergedSearch:
    def __init__(self, resource_type: str, owners: list[str], params: list[tuple[str, str]], fetch: Fetch) -> None:
        self.resource_type = resource_type
        self.owners = owners
        self.params = params
        self.fetch = fetch
        self.count = _count(params)
        self.keys = _sort_keys(resource_type, params)
        self.plain = [(k, v) for k, v in params if k not in (CURSOR, "_count", "_cursor", "_sort")]
        self.sort = [("_sort", ",".join(("-" if d else "") + n for n, d in self.keys))]
        self.included: list[dict[str, Any]] = []
        self.outcomes: list[dict[str, Any]] = []  # warnings the owners added

    async def page(self, state: _State) -> tuple[list[dict[str, Any]], _State]:
        """The page `state` asks for, in ascending order, and the owners' positions at its far end."""
        answers: dict[str, _Answer] = {}
        for owner, where in state.owners.items():
            if where.position != (START if state.backward else END):
                answers[owner] = await self._ask(owner, where, state.backward)
        taken = _merge({o: a.rows for o, a in answers.items()}, self.keys, self.count, state.backward)
        far = _State(state.backward, {o: _Owner(w.position, w.total) for o, w in state.owners.items()})
        for owner, answer in answers.items():
            used = sum(1 for row in taken if row[0] == owner)
            if not answer.rows:  # nothing that way: the owner is done in this direction
                far.owners[owner].position = START if state.backward else END
            elif used:
                far.owners[owner].position = await self._moved(owner, state, answer, used)
        rows = [resource for _, resource in taken]
        return (list(reversed(rows)) if state.backward else rows), far

    async def _ask(self, owner: str, where: _Owner, backward: bool) -> _Answer:
        bundle = await self._search(owner, where.position, backward, self.count, total=True)
        where.total = bundle.get("total") or 0  # owners not asked keep their last count
        entries = bundle.get("entry") or []
        self.included += [e["resource"] for e in entries if _mode(e) == "include"]
        self.outcomes += [e for e in entries if _mode(e) == "outcome" and e not in self.outcomes]
        rows = [e["resource"] for e in entries if _mode(e) == "match"]
        return _Answer(list(reversed(rows)) if backward else rows, _link_cursor(bundle, backward))

    async def _moved(self, owner: str, state: _State, answer: _Answer, used: int) -> str:
        """The owner's position once `used` of its rows are on the page: its own cursor there."""
        onward = answer.onward
        if used < len(answer.rows):  # part of its rows: ask for just those to learn the cursor after them
            bundle = await self._search(owner, state.owners[owner].position, state.backward, used, total=False)
            onward = _link_cursor(bundle, state.backward)
        if onward is None:
            return START if state.backward else END
        return onward

    async def _search(self, owner: str, position: str, backward: bool, count: int, *, total: bool) -> dict[str, Any]:
        query = [*self.plain, *self.sort, ("_count", str(count))]
        if not total:
            query.append(("_total", "none"))
        cursor = _owner_cursor(position, backward, len(self.keys))
        if cursor is not None:
            query.append(("_cursor", cursor))
        status, body = await self.fetch(owner, query)
        if status != 200:
            raise _Refused(owner, status, body)
        return jsonio.loads(body)  # keeps decimals as written


class _Refused(Exception):
    def __init__(self, owner: str, status: int, body: bytes) -> None:
        super().__init__(owner)
        self.owner, self.status, self.body = owner, status, body


def _owner_cursor(position: str, backward: bool, sort_keys: int) -> str | None:
    """The owner's `_cursor` that reads on from `position` in the page's direction."""
    if position == START:
        return None  # forward from the first row (a backward page never reads from START)
    if position == END:
        return Cursor.after_last(sort_keys).encode()  # backward from after the last row
    cursor = Cursor.decode(position)
    return position if cursor.backward == backward else cursor.turned().encode()


def _count(params: list[tuple[str, str]]) -> int:
    count_text = next((v for k, v in params if k == "_count"), str(DEFAULT_COUNT))
    if not count_text.isdigit():
        raise InvalidRequest(f"_count must be a non-negative integer, not '{count_text[:20]}'")
    return min(int(count_text), MAX_COUNT)


async def merged_search(
    resource_type: str, owners: list[str], params: list[tuple[str, str]], fetch: Fetch, base: str
) -> tuple[int, bytes]:
    """(status, body): the merged Bundle, or the first owner's refusal as it gave it."""
    search = _MergedSearch(resource_type, owners, params, fetch)
    state = _State.decode(next((v for k, v in params if k == CURSOR), None), owners)
    try:
        rows, far = await search.page(state)
    except _Refused as refused:
        if refused.status >= 500:
            raise UpstreamUnavailable(f"The {refused.owner} service could not answer its part of the search") from None
        return refused.status, refused.body
    entries = [_entry(base, r, "match") for r in rows] + [_entry(base, r, "include") for r in search.included]
    entries += [jsonio.dumps(outcome) for outcome in search.outcomes]
    total = sum(owner.total for owner in far.owners.values())
    links = _links(base, resource_type, params, state, far, paging=search.count > 0 and bool(rows))
    return 200, bundle_bytes("searchset", entries, total=total, links=links)


def _links(base: str, resource_type: str, params: list[tuple[str, str]], state: _State, far: _State,
           *, paging: bool) -> list[tuple[str, str]]:
    """self, first, and `next` / `previous` when there are rows that way: a forward page's far
    end is where the next page starts and its near end where the previous one ends; backward,
    the other way round."""
    plain = [(k, v) for k, v in params if k != CURSOR]
    links = [("self", _url(base, resource_type, params)), ("first", _url(base, resource_type, plain))]
    if not paging:
        return links
    after, before = (state, far) if state.backward else (far, state)
    if any(o.position != END for o in after.owners.values()):
        links.append(("next", _url(base, resource_type, [*plain, (CURSOR, _State(False, after.owners).encode())])))
    if any(o.position != START for o in before.owners.values()):
        links.append(("previous", _url(base, resource_type, [*plain, (CURSOR, _State(True, before.owners).encode())])))
    return links


def _merge(rows: dict[str, list[dict[str, Any]]], keys: list[tuple[str, bool]], count: int,
           backward: bool) -> list[tuple[str, dict[str, Any]]]:
    """The first `count` rows of the owners' rows in merged order, as (owner, resource); each
    owner's list is already in the page's direction."""
    def order(resource: dict[str, Any]) -> Any:
        merged = _order(resource, keys)
        return _Reversed(merged) if backward else merged

    taken: list[tuple[str, dict[str, Any]]] = []
    heap: list[tuple[Any, str, int]] = []
    for owner, resources in rows.items():
        if resources:
            heapq.heappush(heap, (order(resources[0]), owner, 0))
    while heap and len(taken) < count:
        _, owner, index = heapq.heappop(heap)
        taken.append((owner, rows[owner][index]))
        if index + 1 < len(rows[owner]):
            heapq.heappush(heap, (order(rows[owner][index + 1]), owner, index + 1))
    return taken


def _mode(entry: dict[str, Any]) -> str:
    return (entry.get("search") or {}).get("mode") or "match"


def _link_cursor(bundle: dict[str, Any], backward: bool) -> str | None:
    """The `_cursor` of the owner's `previous` (backward) or `next` link: None when it has no more."""
    relation = "previous" if backward else "next"
    for link in bundle.get("link") or []:
        if link.get("relation") == relation:
            return (parse_qs(urlsplit(link["url"]).query).get("_cursor") or [None])[0]
    return None


def _url(base: str, resource_type: str, params: list[tuple[str, str]]) -> str:
    query = urlencode(params)
    return f"{base}/{resource_type}" + (f"?{query}" if query else "")


def _entry(base: str, resource: dict[str, Any], mode: str) -> bytes:
    return jsonio.dumps({"fullUrl": f"{base}/{resource['resourceType']}/{resource['id']}", "resource": resource,
                         "search": {"mode": mode}})

"""`_include` and `_revinclude` (with `:iterate`) that cross services: a referral inbox's
`_include=Task:patient` (the Patient is the directory's), a directory search's
`_revinclude=Task:patient` (the Tasks are referral's, telemedicine's and results-sharing's), or
`_include:iterate` chains that leave the service the search went to.

A service includes what it holds itself, so when one service answers the search and every type
the includes can reach is held by that service alone, the includes stay with it. Otherwise the
gateway takes every include of the request out of what the owners receive and computes the whole
include set itself, round by round up to a fixed point (at most `MAX_ROUNDS`, `MAX_INCLUDED`
resources): a forward include reads the targets the current resources name, a reverse include
searches the source type for resources pointing at them. Each of those is a search the gateway
sends to every owner of the type *as the caller*, after checking the token's scopes, so an
included resource is exactly one the caller could have found by searching for it: the owners'
access rules decide. Whatever is left out is said in an entry with `search.mode = outcome`.
"""

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import orjson

from fhirkit import jsonio
from fhirkit.api.responses import outcome_entry_bytes, subset
from fhirkit.search import definitions, extract
from fhirkit.search.request import Include, parse_include
from fhirkit.store.repository import MAX_INCLUDE_ITERATIONS
from gateway import routing
from servicekit import topology

MAX_INCLUDED = 1000  # included resources per page, as a service includes at most
MAX_ROUNDS = MAX_INCLUDE_ITERATIONS  # rounds of `:iterate`, as a service follows at most
INCLUDE_KEYS = ("_include", "_revinclude")
# (service, type, search parameters, SMART interaction) → the owner's answer to that search made as
# the caller, as (status, body); 403 with no body when the token's scopes refuse the interaction.
Search = Callable[[str, str, list[tuple[str, str]], str], Awaitable[tuple[int, bytes]]]
Key = tuple[str, str]  # (resourceType, id)


@dataclass(frozen=True)
class ForeignInclude:
    key: str  # as the client wrote it, e.g. `_revinclude:iterate`
    value: str  # e.g. `Task:patient`
    include: Include
    param: definitions.SearchParamDef  # the reference parameter of `include.source_type`


@dataclass
class Plan:
    """What the gateway does itself: every include of the request, and the subset asked for
    (`_elements`, `_summary`), which it applies once the includes are followed, because following
    them needs the whole resources."""

    includes: list[ForeignInclude]
    subset: list[tuple[str, str]]

    def __bool__(self) -> bool:
        return bool(self.includes)


def split(resource_type: str, services: Sequence[str], params: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], Plan]:
    """The parameters the owners (`services`, those the search is sent to) get, and the includes
    the gateway resolves itself: none, or every include of the request."""
    written = [(key, value) for key, value in params if _is_include(key)]
    if not written:
        return params, Plan([], [])
    includes = [_parsed(resource_type, key, value) for key, value in written]
    if len(services) == 1 and all(_held_only_by(services[0], include) for include in includes):
        return params, Plan([], [])
    subset = [(key, value) for key, value in params if _is_subset(key, value)]
    kept = [(key, value) for key, value in params if not _is_include(key) and not _is_subset(key, value)]
    return kept, Plan(includes, subset)


def _is_include(key: str) -> bool:
    return key.partition(":")[0] in INCLUDE_KEYS


def _is_subset(key: str, value: str) -> bool:
    # `_summary=count` has no entries to subset, and a value the owner refuses stays with it.
    return key == "_elements" or (key == "_summary" and value in ("true", "text", "data", "false"))


def _parsed(resource_type: str, key: str, value: str) -> ForeignInclude:
    include = parse_include(resource_type, key, value)  # a malformed include is a 400 here as at a service
    param = definitions.parameters_for(include.source_type)[include.param]
    return ForeignInclude(key, value, include, param)


def _held_only_by(service: str, item: ForeignInclude) -> bool:
    """Whether `service` alone holds every type the include can bring into the Bundle."""
    reached = (item.include.source_type,) if item.include.reverse else _target_types(item)
    return all(topology.owners(t) == [service] for t in reached if topology.owners(t))


def _target_types(item: ForeignInclude) -> tuple[str, ...]:
    return (item.include.target_type,) if item.include.target_type else item.param.targets


async def add_included(body: bytes, plan: Plan, search: Search) -> bytes:
    """`body` (the owners' searchset) with the included resources appended, the subset applied,
    and the includes and subset put back into its paging links (the owners never saw them)."""
    bundle = jsonio.loads(body)  # keeps decimals as written
    entries = bundle.get("entry") or []
    resources = [e["resource"] for e in entries if isinstance(e.get("resource"), dict)]
    matches = [e["resource"] for e in entries if _mode(e) == "match" and isinstance(e.get("resource"), dict)]
    resolver = _Resolver(search, {_key(r) for r in resources})
    await resolver.close_over(matches, plan.includes)
    elements, summary = _subset_request(plan.subset)
    added = [_entry_bytes(e, elements, summary) for e in resolver.found] + list(resolver.notes.values())
    extra = [(i.key, i.value) for i in plan.includes] + plan.subset
    if not (elements or summary):  # the owners' entries stay their bytes
        return _spliced(body, extra, added)
    head = {key: value for key, value in bundle.items() if key != "entry"}
    return _assembled(head, extra, [_entry_bytes(e, elements, summary) for e in entries] + added)


def _subset_request(subset: list[tuple[str, str]]) -> tuple[tuple[str, ...], str | None]:
    elements = tuple(e.strip() for key, value in subset if key == "_elements" for e in value.split(",") if e.strip())
    summary = next((value for key, value in reversed(subset) if key == "_summary"), None)
    return elements, None if summary == "false" else summary


def _entry_bytes(entry: dict[str, Any], elements: tuple[str, ...], summary: str | None) -> bytes:
    resource = entry.get("resource")
    if not isinstance(resource, dict) or _mode(entry) == "outcome" or not (elements or summary):
        return jsonio.dumps(entry)
    content = subset(jsonio.dumps(resource), elements, summary)
    head = {key: value for key, value in entry.items() if key != "resource"}
    return jsonio.dumps(head)[:-1] + b',"resource":' + content + b"}"


def _spliced(body: bytes, extra: list[tuple[str, str]], added: list[bytes]) -> bytes:
    # Only the head (links) is rebuilt. `,"entry":[` cannot occur inside a JSON string of the
    # head, so its first occurrence starts the entries.
    cut = body.find(b',"entry":[')
    if cut < 0:
        return _assembled(orjson.loads(body), extra, added)
    head = _linked(orjson.loads(body[:cut] + b"}"), extra)
    return orjson.dumps(head)[:-1] + body[cut:-2] + b"".join(b"," + entry for entry in added) + b"]}"


def _assembled(head: dict[str, Any], extra: list[tuple[str, str]], entries: list[bytes]) -> bytes:
    prefix = jsonio.dumps(_linked(head, extra))[:-1]
    return prefix + b',"entry":[' + b",".join(entries) + b"]}" if entries else prefix + b"}"


def _linked(head: dict[str, Any], extra: list[tuple[str, str]]) -> dict[str, Any]:
    """The paging links with the parameters the gateway kept from the owners put back."""
    query = urlencode(extra)
    for link in head.get("link") or []:
        link["url"] = f"{link['url']}{'&' if '?' in link['url'] else '?'}{query}"
    return head


class _Resolver:
    """The include set of one page, built round by round."""

    def __init__(self, search: Search, present: set[Key]) -> None:
        self.search = search
        self.present = present  # what the Bundle holds already: never added twice
        self.found: list[dict[str, Any]] = []  # the include entries
        self.notes: dict[str, bytes] = {}  # outcome entries, one per message

    @property
    def full(self) -> bool:
        return len(self.found) >= MAX_INCLUDED

    async def close_over(self, matches: list[dict[str, Any]], includes: list[ForeignInclude]) -> None:
        frontier = matches
        for round_number in range(MAX_ROUNDS):
            found: list[dict[str, Any]] = []
            for item in includes:
                if (round_number == 0 or item.include.iterate) and not self.full:
                    found += await self._follow(item, frontier)
            if not found:
                return
            frontier = found
        if any(item.include.iterate for item in includes):
            self._note("informational", "incomplete",
                       f"_include:iterate / _revinclude:iterate stopped after {MAX_ROUNDS} rounds")

    async def _follow(self, item: ForeignInclude, frontier: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if item.include.reverse:
            return await self._pointing_at(item, frontier)
        found: list[dict[str, Any]] = []
        for target_type, ids in sorted(_references(frontier, item).items()):
            for service, owned in _by_owner(target_type, ids).items():
                query = [("_id", ",".join(owned[:MAX_INCLUDED]))]
                found += await self._ask(service, target_type, query, "r", f"{item.key}={item.value}")
        return found

    async def _pointing_at(self, item: ForeignInclude, frontier: list[dict[str, Any]]) -> list[dict[str, Any]]:
        wanted = _target_types(item)
        references = sorted({f"{r['resourceType']}/{r['id']}" for r in frontier if r.get("resourceType") in wanted})
        if not references:
            return []
        source_type = item.include.source_type
        query = [(item.include.param, ",".join(references[:MAX_INCLUDED]))]
        found: list[dict[str, Any]] = []
        for service in topology.owners(source_type):  # a shared type is asked of every owner
            found += await self._ask(service, source_type, query, "s", f"{item.key}={item.value}")
        return found

    async def _ask(
        self, service: str, resource_type: str, query: list[tuple[str, str]], interaction: str, what: str
    ) -> list[dict[str, Any]]:
        if self.full:
            return []
        status, answer = await self.search(
            service, resource_type, [*query, ("_count", str(MAX_INCLUDED))], interaction)
        if status == 403:
            action = "reading" if interaction == "r" else "searching"
            self._note("warning", "forbidden",
                       f"{what}: the token's scopes do not allow {action} {resource_type}; not included")
            return []
        if status != 200:
            self._note("warning", "incomplete",
                       f"{what}: the {resource_type} resources could not be read ({status}); not included")
            return []
        return self._add(jsonio.loads(answer).get("entry") or [])

    def _add(self, entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        fresh: list[dict[str, Any]] = []
        for entry in entries:
            resource = entry.get("resource")
            if _mode(entry) != "match" or not isinstance(resource, dict) or _key(resource) in self.present:
                continue
            if self.full:
                self._note("informational", "too-costly",
                           f"At most {MAX_INCLUDED} resources are included per page; the rest are left out")
                break
            self.present.add(_key(resource))
            fresh.append(resource)
            self.found.append({"fullUrl": entry.get("fullUrl"), "resource": resource, "search": {"mode": "include"}})
        return fresh

    def _note(self, severity: str, code: str, diagnostics: str) -> None:
        self.notes.setdefault(diagnostics, outcome_entry_bytes(severity, code, diagnostics))


def _references(resources: list[dict[str, Any]], item: ForeignInclude) -> dict[str, list[str]]:
    """Target type → ids that the include's parameter names in `resources` (relative references
    to a type the alliance holds; others cannot be read here)."""
    wanted = set(_target_types(item))
    found: dict[str, set[str]] = {}
    for resource in resources:
        if resource.get("resourceType") != item.include.source_type:
            continue
        for value in extract.extract_values(resource, item.param):
            reference = value.get("reference") if isinstance(value, dict) else None
            target_type, target_id = _split_relative(reference)
            if target_type in wanted and topology.owners(target_type):
                found.setdefault(target_type, set()).add(target_id)
    return {target_type: sorted(ids) for target_type, ids in found.items()}


def _split_relative(reference: Any) -> tuple[str, str]:
    if not isinstance(reference, str) or reference.count("/") not in (1, 3):
        return "", ""
    parts = reference.split("/")
    if len(parts) == 4 and parts[2] != "_history":
        return "", ""
    return (parts[0], parts[1]) if parts[0] and parts[1] else ("", "")


def _by_owner(resource_type: str, ids: list[str]) -> dict[str, list[str]]:
    """The ids to ask each owner for: an id minted by one owner (`tm-`, `rs-`) is asked of it alone."""
    asked: dict[str, list[str]] = {}
    for resource_id in ids:
        for service in routing.services_for_id(resource_type, resource_id):
            asked.setdefault(service, []).append(resource_id)
    return asked


def _mode(entry: dict[str, Any]) -> str:
    return (entry.get("search") or {}).get("mode") or "match"


def _key(resource: dict[str, Any]) -> Key:
    return str(resource.get("resourceType")), str(resource.get("id"))

"""`_include` of resources another service holds (a referral inbox's `_include=Task:patient`:
the Task lives in the referral service, the Patient in the directory).

A service includes what it holds itself. An `_include` whose every possible target is held
elsewhere is taken out of the request the owner receives; the gateway then reads the targets the
matches name from their owners, as the caller (so the owners' access rules decide what comes
back), and adds them to the Bundle as `search.mode = include`. `:iterate` and `_revinclude`
stay with the owner, which says in the Bundle what it could not include.
"""

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import orjson

from fhirkit import jsonio
from fhirkit.api.responses import outcome_entry_bytes
from fhirkit.search import definitions, extract
from gateway import routing
from servicekit import topology

MAX_INCLUDED = 1000
# (service, type, ids) → the owner's answer to `GET type?_id=…` as (status, body)
Fetch = Callable[[str, str, list[str]], Awaitable[tuple[int, bytes]]]


@dataclass(frozen=True)
class ForeignInclude:
    value: str  # as the client wrote it, e.g. Task:patient
    param: definitions.SearchParamDef
    target_types: tuple[str, ...]


def split(
    resource_type: str, services: Sequence[str], params: list[tuple[str, str]]
) -> tuple[list[tuple[str, str]], list[ForeignInclude]]:
    """The parameters the owners (`services`, those the search is sent to) get, and the includes
    the gateway resolves itself."""
    kept: list[tuple[str, str]] = []
    foreign: list[ForeignInclude] = []
    for key, value in params:
        include = _foreign(resource_type, services, value) if key == "_include" else None
        if include is None:
            kept.append((key, value))
        else:
            foreign.append(include)
    return kept, foreign


def _foreign(resource_type: str, services: Sequence[str], value: str) -> ForeignInclude | None:
    parts = value.split(":")
    if len(parts) not in (2, 3) or parts[0] != resource_type:
        return None  # malformed or about another type: the owner answers it as it always did
    param = definitions.parameters_for(resource_type).get(parts[1])
    if param is None or param.type != "reference":
        return None
    targets = (parts[2],) if len(parts) == 3 else param.targets
    held = [t for t in targets if topology.owners(t)]
    if not held or any(set(services) & set(topology.owners(t)) for t in held):
        return None
    return ForeignInclude(value, param, tuple(held))


async def add_included(body: bytes, includes: list[ForeignInclude], fetch: Fetch) -> bytes:
    """`body` (the owners' searchset) with the resources the includes name appended, and the
    includes put back into its paging links (the owners never saw them)."""
    bundle = orjson.loads(body)
    entries = bundle.get("entry") or []
    matches = [e["resource"] for e in entries
               if (e.get("search") or {}).get("mode") == "match" and isinstance(e.get("resource"), dict)]
    present = {e.get("fullUrl") for e in entries}
    added: list[bytes] = []
    for resource_type, ids in sorted(_targets(matches, includes).items()):
        for service in routing.owners_of(resource_type):
            added += await _read_included(fetch, service, resource_type, sorted(ids)[:MAX_INCLUDED], present)
    return _spliced(body, includes, added[:MAX_INCLUDED])


async def _read_included(fetch: Fetch, service: str, resource_type: str, ids: list[str], present: set[Any]) -> list[bytes]:
    status, answer = await fetch(service, resource_type, ids)
    if status == 403:
        return [outcome_entry_bytes(
            "warning", "forbidden", f"_include: the token's scopes do not allow reading {resource_type}; not included")]
    if status != 200:
        return [outcome_entry_bytes(
            "warning", "incomplete", f"_include: the {resource_type} resources could not be read ({status})")]
    found = []
    for entry in jsonio.loads(answer).get("entry") or []:
        full_url = entry.get("fullUrl")
        if (entry.get("search") or {}).get("mode") == "match" and full_url not in present:
            present.add(full_url)
            # Decimals as stored: jsonio keeps their written form through the round trip.
            found.append(b'{"fullUrl":' + orjson.dumps(full_url) + b',"resource":' + jsonio.dumps(entry["resource"])
                         + b',"search":{"mode":"include"}}')
    return found


def _spliced(body: bytes, includes: list[ForeignInclude], added: list[bytes]) -> bytes:
    # The entries stay the owners' bytes; only the head (links) is rebuilt. `,"entry":[` cannot
    # occur inside a JSON string of the head, so its first occurrence starts the entries.
    cut = body.find(b',"entry":[')
    head = orjson.loads(body[:cut] + b"}" if cut >= 0 else body)
    extra = urlencode([("_include", include.value) for include in includes])
    for link in head.get("link") or []:
        link["url"] = f"{link['url']}{'&' if '?' in link['url'] else '?'}{extra}"
    prefix = orjson.dumps(head)[:-1]
    if cut < 0:
        return prefix + (b',"entry":[' + b",".join(added) + b"]}" if added else b"}")
    return prefix + body[cut:-2] + b"".join(b"," + entry for entry in added) + b"]}"


def _targets(matches: list[dict[str, Any]], includes: list[ForeignInclude]) -> dict[str, set[str]]:
    wanted: dict[str, set[str]] = {}
    for resource in matches:
        for include in includes:
            for value in extract.extract_values(resource, include.param):
                reference = value.get("reference") if isinstance(value, dict) else None
                target_type, _, target_id = reference.partition("/") if isinstance(reference, str) else ("", "", "")
                if target_type in include.target_types and target_id and "/" not in target_id:
                    wanted.setdefault(target_type, set()).add(target_id)
    return wanted

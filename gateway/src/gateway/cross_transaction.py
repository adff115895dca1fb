"""A transaction Bundle whose entries belong to several services, run as a saga.

Each service has its own database, so no commit spans them. The gateway instead:

1. splits the Bundle into one piece per service. Every create gets its id here, beforehand (with
   the owner's id prefix, servicekit.topology.ID_PREFIXES), so that references between pieces
   can be rewritten (`urn:uuid:…` → `DocumentReference/{id}`) and a piece whose outcome is unknown
   can still be undone; within a piece the service resolves its own `urn:uuid`s as usual;
2. dry-runs every piece (the service executes it in its database transaction, then rolls it
   back): the first refusal is the answer, with that piece's OperationOutcome, nothing written.
   The resources other pieces create are "pending" references: the dry run takes them as existing;
3. commits the pieces in dependency order (a piece others refer to first);
4. if a piece fails anyway (a conflict since the dry run, a database error, a service gone), asks
   the earlier pieces' services to remove what they created (compensation) and answers that
   piece's error together with what the compensation did;
5. answers one transaction-response, entries in the client's order.

Refused with 422 before anything runs (rules a client can avoid): a conditional create or a
conditional update whose `fullUrl` another service's entry refers to (which resource it ends up
being is known only when it runs), a conditional reference to a type held by another service, a
reference to a resource another piece deletes, and (after the dry run) changes to existing
resources in more than one service (only creates can be undone; the one changing piece commits last).

The internal calls (fhirkit/api/compensation.py) carry the client's signed identity plus the
coordinator role, which no client token ever gets, and the step header (`dry-run`, `commit`,
`compensate`), set here only: the gateway forwards a fixed list of client headers, none of them
`X-Alliance-*`.
"""

import dataclasses
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fhirkit import jsonio
from fhirkit.api.compensation import COMMIT, COMPENSATE, COORDINATOR_ROLE, DRY_RUN
from fhirkit.errors import BusinessRuleViolation, FhirError
from servicekit import topology
from servicekit.app import new_id_for

# send(service, step, body) → (status, content): `POST /fhir` with the step header (its answer);
# transport failures raise FhirError.
Send = Callable[[str, str, bytes], Awaitable[tuple[int, bytes]]]
RULE = "see docs/api.md, 'Transactions spanning services'"
CHANGING_METHODS = ("PUT", "PATCH", "DELETE")


def coordinator(identity: Any) -> Any:
    """The client's identity, as the services see it on the saga's internal calls."""
    return dataclasses.replace(identity, roles=(*identity.roles, COORDINATOR_ROLE))


@dataclass
class Piece:
    service: str
    indexes: list[int] = field(default_factory=list)  # positions in the client's Bundle
    entries: list[dict[str, Any]] = field(default_factory=list)
    assigned_ids: dict[int, str] = field(default_factory=dict)
    writes: set[str] = field(default_factory=set)  # "Type/id" its entries create or replace
    refers_to: set[str] = field(default_factory=set)  # what other pieces write, referred to here
    depends_on: set[str] = field(default_factory=set)  # the services of those pieces
    changes_existing: bool = False  # the dry run updated or deleted existing resources
    answer: list[dict[str, Any]] = field(default_factory=list)  # the committed response entries

    def body(self, pending: set[str]) -> bytes:
        return jsonio.dumps({
            "bundle": {"resourceType": "Bundle", "type": "transaction", "entry": self.entries},
            "entryIndexes": self.indexes,
            "assignedIds": {str(index): new_id for index, new_id in self.assigned_ids.items()},
            "pendingReferences": sorted(pending),
        })


async def run(bundle: dict[str, Any], services: list[str], send: Send) -> tuple[int, bytes]:
    """The client's answer: (status, body)."""
    pieces = split(bundle["entry"], services)
    order = commit_order(pieces)
    for piece in order:
        status, content = await send(piece.service, DRY_RUN, piece.body(piece.refers_to))
        if status != 200:
            return status, content
        piece.changes_existing = _changes_existing(piece, _response_bundle(content).get("entry") or [])
    order = _changing_piece_last(order)
    return await _commit(order, send)


# --- splitting --------------------------------------------------------------------------------


@dataclass
class _Target:
    """What an entry's fullUrl stands for in the other pieces."""

    piece: Piece
    index: int
    reference: str | None  # "Type/id"; None when only running the entry tells (a conditional write)
    may_create: bool  # POST or PUT: it may not exist before the piece commits


@dataclass
class _Bundle:
    """The client's entries as the split sees them."""

    by_full_url: dict[str, _Target] = field(default_factory=dict)
    written_by: dict[str, Piece] = field(default_factory=dict)  # "Type/id" a POST or PUT writes
    deleted: dict[str, _Target] = field(default_factory=dict)  # "Type/id" a DELETE removes


def split(entries: list[dict[str, Any]], services: list[str]) -> list[Piece]:
    """One piece per service, in the order the services first appear."""
    pieces: dict[str, Piece] = {}
    seen = _Bundle()
    for index, (entry, service) in enumerate(zip(entries, services)):
        piece = pieces.setdefault(service, Piece(service))
        target = _target(piece, index, entry)
        if target is None:
            continue
        if _method(entry) == "DELETE":
            seen.deleted[str(target.reference)] = target
            continue
        if target.may_create and target.reference is not None:
            piece.writes.add(target.reference)
            seen.written_by[target.reference] = piece
        if isinstance(entry.get("fullUrl"), str):
            seen.by_full_url[entry["fullUrl"]] = target
    for index, (entry, service) in enumerate(zip(entries, services)):
        piece = pieces[service]
        piece.indexes.append(index)
        piece.entries.append(_rewritten(entry, index, piece, seen))
    return list(pieces.values())


def _target(piece: Piece, index: int, entry: dict[str, Any]) -> _Target | None:
    """The resource an entry is about, if it names one; a POST's id is chosen here."""
    method, url = _method(entry), _url(entry)
    if method == "POST":
        new_id = new_id_for(piece.service)(_type(entry))
        piece.assigned_ids[index] = new_id
        if_none_exist = (entry.get("request") or {}).get("ifNoneExist")
        return _Target(piece, index, None if if_none_exist else f"{_type(entry)}/{new_id}", may_create=True)
    conditional = "?" in url
    if method == "PUT":
        return _Target(piece, index, None if conditional else url.strip("/"), may_create=True)
    if conditional or "/" not in url.strip("/"):
        return None  # a search, a conditional patch or delete: no one resource to name
    return _Target(piece, index, "/".join(url.strip("/").split("/")[:2]), may_create=False)


def _rewritten(entry: dict[str, Any], index: int, piece: Piece, seen: _Bundle) -> dict[str, Any]:
    """The entry with references to other pieces' entries made `Type/id`, and those noted."""

    def rewrite(value: Any, key: str | None) -> Any:
        if isinstance(value, dict):
            return {k: rewrite(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [rewrite(v, key) for v in value]
        if not isinstance(value, str):
            return value
        target = seen.by_full_url.get(value)
        if target is not None and target.piece is not piece:
            value = _resolved(target, value, index)
        if key == "reference" or target is not None:
            _check_reference(piece, value, index, seen)
            _note_reference(piece, value, seen)
        return value

    if not isinstance(entry.get("resource"), dict):
        return entry
    return {**entry, "resource": rewrite(entry["resource"], None)}


def _resolved(target: _Target, full_url: str, index: int) -> str:
    if target.reference is None:
        raise BusinessRuleViolation(
            f"Bundle.entry[{index}] refers to {full_url[:80]}, the conditional entry Bundle.entry[{target.index}] "
            f"of another service: in a transaction spanning services, an entry another service's entry refers "
            f"to must not be a conditional create or update (which resource it becomes is known only when it "
            f"runs; {RULE}). Create it with a plain POST, or PUT Type/id."
        )
    return target.reference


def _note_reference(piece: Piece, reference: str, seen: _Bundle) -> None:
    resource = reference.split("/_history/")[0]
    writer = seen.written_by.get(resource)
    if writer is not None and writer is not piece:
        piece.refers_to.add(resource)
        piece.depends_on.add(writer.service)


def _check_reference(piece: Piece, reference: str, index: int, seen: _Bundle) -> None:
    deletion = seen.deleted.get(reference.split("/_history/")[0])
    if deletion is not None and deletion.piece is not piece:
        raise BusinessRuleViolation(
            f"Bundle.entry[{index}] refers to {deletion.reference}, which Bundle.entry[{deletion.index}] deletes "
            f"in another service ({RULE})"
        )
    resource_type, conditional, _ = reference.partition("?")
    if conditional and "/" not in resource_type and ":" not in resource_type:
        if resource_type not in topology.OWNED_TYPES.get(piece.service, ()):
            raise BusinessRuleViolation(
                f"Bundle.entry[{index}]: the conditional reference '{reference[:80]}' names a type the "
                f"{piece.service} service does not hold: a conditional reference is resolved by the service of "
                f"its entry ({RULE}). Refer to the resource by Type/id, or to its entry's fullUrl."
            )


def commit_order(pieces: list[Piece]) -> list[Piece]:
    """Pieces others refer to first; in a cycle, the earliest piece of the Bundle first (its
    references to the later ones stay pending until they commit)."""
    placed: list[Piece] = []
    while len(placed) < len(pieces):
        done = {p.service for p in placed}
        waiting = [p for p in pieces if p not in placed]
        ready = [p for p in waiting if p.depends_on <= done]
        placed.append((ready or waiting)[0])
    return placed


def _changing_piece_last(order: list[Piece]) -> list[Piece]:
    changing = [p for p in order if p.changes_existing]
    if len(changing) > 1:
        names = ", ".join(p.service for p in changing)
        raise BusinessRuleViolation(
            f"This transaction updates or deletes existing resources in several services ({names}); only "
            f"creates can be undone if a later service fails, so a transaction spanning services may change "
            f"existing resources in one service only ({RULE}). Send the changes as separate transactions."
        )
    return [p for p in order if not p.changes_existing] + changing


def _changes_existing(piece: Piece, answer: list[dict[str, Any]]) -> bool:
    for entry, response in zip(piece.entries, answer):
        status = str((response.get("response") or {}).get("status", ""))
        if _method(entry) in CHANGING_METHODS and not status.startswith("201"):
            return True
    return False


# --- committing and compensating --------------------------------------------------------------


async def _commit(order: list[Piece], send: Send) -> tuple[int, bytes]:
    committed: list[Piece] = []
    answer: dict[str, Any] = {}
    for piece in order:
        pending = {r for r in piece.refers_to if not any(r in p.writes for p in committed)}
        try:
            status, content = await send(piece.service, COMMIT, piece.body(pending))
        except FhirError as exc:
            # The answer was lost: the piece may have committed. Its creates are undone too.
            issues = await _compensate([*committed, _unknown_outcome(piece)], send)
            return exc.status_code, _outcome([*exc.issues(), _lost(piece), *issues])
        if status != 200:
            issues = await _compensate(committed, send)
            return status, _outcome([*_issues_of(content), *issues])
        answer = _response_bundle(content)
        piece.answer = list(answer.get("entry") or [])
        committed.append(piece)
    return 200, _merged(order, answer.get("meta"))


def _unknown_outcome(piece: Piece) -> Piece:
    """The piece as if every create had committed at version 1 (what is not there is skipped)."""
    types = dict(zip(piece.indexes, map(_type, piece.entries)))
    created = [{"response": {"status": "201 Created", "location": f"{types[index]}/{new_id}/_history/1"}}
               for index, new_id in piece.assigned_ids.items()]
    return Piece(piece.service, indexes=list(piece.assigned_ids), answer=created)


async def _compensate(pieces: list[Piece], send: Send) -> list[dict[str, Any]]:
    issues: list[dict[str, Any]] = []
    for piece in reversed(pieces):
        removals = dict(_removals(piece))
        issues.extend(_not_undone(piece))
        if not removals:
            continue
        body = jsonio.dumps({"remove": list(removals.values())})
        try:
            status, content = await send(piece.service, COMPENSATE, body)
        except FhirError as exc:
            status, content = exc.status_code, exc.to_bytes()
        if status == 200:
            issues.extend(_located(_issues_of(content), list(removals)))
        else:
            left = ", ".join(r["reference"] for r in removals.values())
            issues.append(_issue("error", "incomplete", (
                f"The {piece.service} service answered {status} when asked to remove what this transaction "
                f"created there, which is still stored: {left}")))
    return issues


def _removals(piece: Piece) -> Iterator[tuple[int, dict[str, str]]]:
    """What the piece created, by entry index: the version its commit answered."""
    for index, entry in zip(piece.indexes, piece.answer):
        response = entry.get("response") or {}
        location = str(response.get("location", ""))
        if str(response.get("status", "")).startswith("201") and "/_history/" in location:
            reference, _, version = location.partition("/_history/")
            yield index, {"reference": reference, "versionId": version}


def _located(issues: list[dict[str, Any]], indexes: list[int]) -> list[dict[str, Any]]:
    """The service answers one issue per removal, in order: each is said of its entry."""
    if len(issues) != len(indexes):
        return issues
    return [{**issue, "diagnostics": f"Bundle.entry[{index}]: {issue.get('diagnostics', '')}"}
            for index, issue in zip(indexes, issues)]


def _not_undone(piece: Piece) -> Iterator[dict[str, Any]]:
    # Not expected (changes of existing resources commit last), but said if it happens: a PUT
    # that created at the dry run and found the resource created by someone else at the commit.
    for index, entry, answer in zip(piece.indexes, piece.entries, piece.answer):
        status = str((answer.get("response") or {}).get("status", ""))
        if _method(entry) in CHANGING_METHODS and not status.startswith("201"):
            yield _issue("error", "incomplete", f"Bundle.entry[{index}] ({_method(entry)} {_url(entry)[:80]}) "
                                                f"was committed and cannot be undone")


def _lost(piece: Piece) -> dict[str, Any]:
    return _issue("warning", "incomplete", (
        f"The answer of the {piece.service} service was lost: its part of the transaction may have committed. "
        "What it may have created was asked to be removed (the next issues); changes it made to existing "
        "resources, if it had any, cannot be undone"))


# --- answers ----------------------------------------------------------------------------------


def _merged(order: list[Piece], meta: Any) -> bytes:
    entries: list[Any] = [None] * sum(len(p.indexes) for p in order)
    for piece in order:
        for index, answer in zip(piece.indexes, piece.answer):
            entries[index] = answer
    head = {"resourceType": "Bundle", **({"meta": meta} if meta else {}), "type": "transaction-response"}
    return jsonio.dumps({**head, "entry": entries})


def _response_bundle(content: bytes) -> dict[str, Any]:
    answer = jsonio.loads(content)
    return answer if isinstance(answer, dict) else {}


def _issues_of(content: bytes) -> list[dict[str, Any]]:
    try:
        answer = jsonio.loads(content)
    except FhirError:
        answer = None
    if isinstance(answer, dict) and answer.get("resourceType") == "OperationOutcome":
        return list(answer.get("issue") or [])
    return [_issue("error", "exception", "A service answered without an OperationOutcome")]


def _outcome(issues: list[dict[str, Any]]) -> bytes:
    return jsonio.dumps({"resourceType": "OperationOutcome", "issue": issues})


def _issue(severity: str, code: str, diagnostics: str) -> dict[str, Any]:
    return {"severity": severity, "code": code, "diagnostics": diagnostics}


def _method(entry: dict[str, Any]) -> str:
    return str((entry.get("request") or {}).get("method", "")).upper()


def _url(entry: dict[str, Any]) -> str:
    return str((entry.get("request") or {}).get("url", ""))


def _type(entry: dict[str, Any]) -> str:
    return _url(entry).split("?")[0].split("/")[0]

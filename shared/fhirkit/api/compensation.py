"""The service side of a transaction spanning services (the gateway's saga, gateway/cross_transaction.py).

The gateway sends each step as `POST /fhir` (where Bundles go) with the internal header
`X-Alliance-Transaction-Step`:

* `dry-run` and `commit` run this service's piece of the client's transaction. The body is
  `{"bundle": <transaction Bundle>, "entryIndexes": [...], "assignedIds": {"<index>": "<id>"},
  "pendingReferences": ["Type/id", ...]}`: the entries keep their indexes in the client's Bundle
  (every error names those), creates take the ids the gateway chose (other pieces refer to them),
  and the pending references are resources another piece creates, not written yet, which the
  reference check takes as existing. A dry run executes the piece in the request's database
  transaction and rolls it back (outbox rows and grants included): the answer says whether it
  would commit, and what it would answer.
* `compensate` removes again what a committed piece created, when a later piece failed:
  `{"remove": [{"reference": "Type/id", "versionId": "1"}]}`, each removed (a deletion, with its
  event) only if that version is still the current one. The answer is an OperationOutcome with
  one issue per resource, saying what was done.

Trust: services never trust client headers (servicekit.identity). A step is run only for a caller
whose gateway-signed identity carries COORDINATOR_ROLE, which the gateway adds only to its own
calls for such a transaction (no client can obtain it: roles come from the gateway's scope table);
anyone else sending the header is refused with 403. The gateway forwards no `X-Alliance-*` header a
client sends, so a client's dry-run header never reaches a service.
"""

import dataclasses
from typing import Any

import orjson
from starlette.requests import Request

from fhirkit import jsonio, resources
from fhirkit.api import bundles
from fhirkit.api.interactions import Result
from fhirkit.errors import FhirError, Forbidden, InvalidRequest, ResourceGone, ResourceNotFound
from fhirkit.store.repository import Repository

COORDINATOR_ROLE = "transaction-coordinator"
STEP_HEADER = "X-Alliance-Transaction-Step"
DRY_RUN, COMMIT, COMPENSATE = "dry-run", "commit", "compensate"


def requested_step(request: Request) -> str | None:
    """The step the header asks for; None: an ordinary batch or transaction."""
    return request.headers.get(STEP_HEADER.lower())


async def run_step(call: Any) -> Result:
    """`call`: the router's request call (its repo in the request's write transaction)."""
    if COORDINATOR_ROLE not in getattr(call.caller, "roles", ()):
        raise Forbidden(f"Only the gateway may send {STEP_HEADER}: it runs the pieces of a transaction spanning services")
    step = requested_step(call.request)
    if step == COMPENSATE:
        return await _compensate(call)
    if step in (DRY_RUN, COMMIT):
        return await _run_piece(call, dry_run=step == DRY_RUN)
    raise InvalidRequest(f"{STEP_HEADER} is {DRY_RUN}, {COMMIT} or {COMPENSATE}")


# --- a piece ----------------------------------------------------------------------------------


async def _run_piece(call: Any, *, dry_run: bool) -> Result:
    piece = _json_object(call.raw)
    bundle = resources.require_resource(piece.get("bundle"), "Bundle")
    if bundle.get("type") != "transaction":
        raise InvalidRequest("A transaction piece carries a transaction Bundle")
    repo = _with_pending_references(call.repo, _pending_references(piece))
    processor = bundles.BundleProcessor(repo, call.options, repo.conn.begin_nested)
    indexes, assigned_ids = _entry_indexes(piece), _assigned_ids(piece)
    if dry_run:
        return Result(200, await processor.dry_run(bundle, indexes=indexes, assigned_ids=assigned_ids))
    return Result(200, await processor.transaction(bundle, indexes=indexes, assigned_ids=assigned_ids))


class PendingReferences:
    """The service's reference resolver (servicekit.peers), except that the resources another
    piece of the same transaction creates count as existing: during the dry run nothing is
    written yet, and when references form a cycle one piece commits before the other."""

    def __init__(self, inner: Any, pending: frozenset[tuple[str, str]]) -> None:
        self.inner = inner
        self.pending = pending

    def holds(self, resource_type: str) -> bool:
        return bool(self.inner.holds(resource_type))

    async def exists(self, resource_type: str, resource_id: str) -> bool:
        return (resource_type, resource_id) in self.pending or bool(await self.inner.exists(resource_type, resource_id))

    async def read(self, resource_type: str, resource_id: str, **options: Any) -> Any:
        # Not there yet: reading it would also leave "absent" in the peers' cache.
        if (resource_type, resource_id) in self.pending:
            return None
        return await self.inner.read(resource_type, resource_id, **options)

    def __getattr__(self, name: str) -> Any:  # search, client, ...: as the service's own resolver
        return getattr(self.inner, name)


def _with_pending_references(repo: Repository, pending: frozenset[tuple[str, str]]) -> Repository:
    if not pending:
        return repo
    config = dataclasses.replace(repo.config, references=PendingReferences(repo.config.references, pending))
    return Repository(repo.conn, config, owner=repo.owner, caller=repo.caller)


def _pending_references(piece: dict[str, Any]) -> frozenset[tuple[str, str]]:
    found = set()
    for reference in _list(piece, "pendingReferences"):
        resource_type, _, resource_id = str(reference).partition("/")
        if not resource_type or not resource_id:
            raise InvalidRequest(f"Pending reference '{str(reference)[:80]}' is not Type/id")
        found.add((resource_type, resource_id))
    return frozenset(found)


def _entry_indexes(piece: dict[str, Any]) -> list[int] | None:
    if piece.get("entryIndexes") is None:
        return None
    indexes = _list(piece, "entryIndexes")
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indexes):
        raise InvalidRequest("entryIndexes must be entry positions")
    return indexes


def _assigned_ids(piece: dict[str, Any]) -> dict[int, str]:
    assigned = piece.get("assignedIds") or {}
    if not isinstance(assigned, dict):
        raise InvalidRequest("assignedIds must map entry indexes to ids")
    try:
        return {int(index): resources.check_id(str(new_id)) for index, new_id in assigned.items()}
    except ValueError:
        raise InvalidRequest("assignedIds must map entry indexes to ids") from None


# --- compensation -----------------------------------------------------------------------------


async def _compensate(call: Any) -> Result:
    issues = [await _remove(call.repo, reference, version) for reference, version in _removals(call.raw)]
    return Result(200, orjson.dumps({"resourceType": "OperationOutcome", "issue": issues}))


async def _remove(repo: Repository, reference: str, version: int) -> dict[str, Any]:
    """Remove the version a saga created if it is still current; say what happened either way."""
    resource_type, _, resource_id = reference.partition("/")
    try:
        # Its own savepoint: one refusal leaves the other removals standing.
        async with repo.conn.begin_nested():
            current = await repo.read(resource_type, resource_id)
            if current.version_id != version:
                return _issue("error", "conflict", (
                    f"{reference} was changed after this transaction created it (version {current.version_id} "
                    f"is current, not {version}): it was left as it is"))
            await repo.delete(resource_type, resource_id, if_match=version)
    except ResourceNotFound:
        return _issue("information", "informational", f"{reference} was not created: nothing to remove")
    except ResourceGone:
        return _issue("warning", "conflict", f"{reference} was already deleted by someone else")
    except FhirError as exc:
        return _issue("error", exc.issue_code, f"{reference} could not be removed: {exc.diagnostics}")
    return _issue("information", "informational", f"{reference} (version {version}) was removed again")


def _removals(raw: bytes) -> list[tuple[str, int]]:
    out = []
    for item in _list(_json_object(raw), "remove"):
        reference = item.get("reference") if isinstance(item, dict) else None
        version = str(item.get("versionId", "")) if isinstance(item, dict) else ""
        if not isinstance(reference, str) or reference.count("/") != 1 or not version.isdigit():
            raise InvalidRequest("Each removal is {reference: Type/id, versionId}")
        out.append((reference, int(version)))
    return out


# --- shared -----------------------------------------------------------------------------------


def _json_object(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise InvalidRequest("The request has no body")
    value = jsonio.loads(raw)
    if not isinstance(value, dict):
        raise InvalidRequest("The body must be a JSON object")
    return value


def _list(value: dict[str, Any], key: str) -> list[Any]:
    found = value.get(key) or []
    if not isinstance(found, list):
        raise InvalidRequest(f"{key} must be an array")
    return found


def _issue(severity: str, code: str, diagnostics: str) -> dict[str, Any]:
    return {"severity": severity, "code": code, "diagnostics": diagnostics}

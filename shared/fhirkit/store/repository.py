"""The FHIR repository on SQL: one object per request, bound to its connection and caller.

Writes validate once, check references, run the service's hooks, then store the client's JSON
(with server-owned `meta`) and its index rows in the caller's transaction. Reads return stored
bytes and never build a model.
"""

import asyncio
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    String,
    bindparam,
    delete,
    exists,
    false,
    func,
    insert,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from fhirkit import jsonio, resources
from fhirkit.access import SEARCH_ALIAS, AccessPolicy
from fhirkit.errors import (
    FhirError,
    Forbidden,
    InvalidRequest,
    MultipleMatches,
    NotSupported,
    PreconditionFailed,
    ResourceGone,
    ResourceNotFound,
    UnprocessableEntity,
    VersionConflict,
    located,
)
from fhirkit.search.request import Filter, HasFilter, Include, SearchRequest, parse_search
from fhirkit.search.values import format_instant, natural, now_micros
from fhirkit.store import driver, indexing, query
from fhirkit.store.hooks import (
    BatchHooks,
    NoForeignTypes,
    NoHooks,
    ReferenceResolver,
    ResourceHooks,
    WriteContext,
)
from fhirkit.store.tables import INDEX_TABLES, reference_index, resource, resource_history

MAX_INCLUDED = 1000
# Enough for the deepest chain the alliance has (village → township → county → city → province)
# reached from another type; MAX_INCLUDED bounds the work anyway.
MAX_INCLUDE_ITERATIONS = 8
SERVER_META = ("versionId", "lastUpdated")


@dataclass(frozen=True)
class StoredResource:
    resource_type: str
    resource_id: str
    version_id: int
    last_updated: int
    deleted: bool
    content: bytes | None
    owner: str | None = None
    method: str | None = None

    @property
    def etag(self) -> str:
        return f'W/"{self.version_id}"'

    @property
    def reference(self) -> str:
        return f"{self.resource_type}/{self.resource_id}"

    def parsed(self) -> dict[str, Any]:
        assert self.content is not None
        return jsonio.loads(self.content)


@dataclass(frozen=True)
class WriteOutcome:
    stored: StoredResource
    created: bool
    changed: bool = True


@dataclass
class SearchPage:
    matches: list[StoredResource]
    included: list[StoredResource]
    total: int | None
    next_cursor: str | None
    previous_cursor: str | None
    warnings: list[str] = field(default_factory=list)


@dataclass
class StoreConfig:
    """What a service's store holds and how it behaves; built once per service."""

    resource_types: frozenset[str]
    hooks: dict[str, ResourceHooks] = field(default_factory=dict)
    references: ReferenceResolver = field(default_factory=NoForeignTypes)
    new_id: Callable[[str], str] = lambda resource_type: str(uuid.uuid4())
    clock: Callable[[], int] = now_micros
    check_references: bool = True
    # Who sees what (fhirkit.access). None only for stores without callers (engine unit tests).
    access: AccessPolicy | None = None
    # Types written once and never changed or deleted (the audit trail): their one version is the
    # resource row alone, without a copy in the history table; history and vread read that row.
    append_only: frozenset[str] = frozenset()

    def hooks_for(self, resource_type: str) -> ResourceHooks:
        return self.hooks.get(resource_type) or _NO_HOOKS


_NO_HOOKS = NoHooks()


class Repository:
    def __init__(
        self,
        conn: AsyncConnection,
        config: StoreConfig,
        *,
        owner: str | None = None,
        in_transaction: bool = False,
        caller: Any = None,
    ) -> None:
        self.conn = conn
        # Who is asking (the service's identity object): hooks decide by it, and the access
        # policy filters every read by it. None is the server itself (loaders, event consumers).
        self.caller = caller
        self.config = config
        self.owner = owner
        self.in_transaction = in_transaction
        self._is_postgres = conn.dialect.name == "postgresql"
        # Bodies whose references are checked later (see defer_reference_checks).
        self.deferred_references: list[dict[str, Any]] | None = None
        # While `create_together` runs: what its hooks keep about the run (fhirkit.store.hooks.BatchHooks).
        self.batch_memo: dict[str, Any] | None = None

    def unrestricted(self) -> "Repository":
        """The same transaction seen by the server itself: for a hook's internal lookups (the
        earlier hops of a chain) whose results are not shown to the caller as they are."""
        clone = Repository(self.conn, self.config, owner=self.owner, in_transaction=self.in_transaction)
        clone.deferred_references = self.deferred_references
        return clone

    def visibility(self, target: Any, resource_type: str | None = None) -> ColumnElement[bool] | None:
        """The access policy's condition on a `fhir_resource` alias for this caller (None: all);
        `resource_type` when the query fixes the rows' type (a smaller condition)."""
        if self.config.access is None or self.caller is None:
            return None
        return self.config.access.visible(self.caller, target, now=self._now(), resource_type=resource_type)

    def _modifiability(self, target: Any) -> ColumnElement[bool] | None:
        if self.config.access is None or self.caller is None:
            return None
        return self.config.access.modifiable(self.caller, target)

    async def _require_access(self, current: StoredResource, *, write: bool = False) -> None:
        """404 for what the caller may not see (its existence is not revealed), 403 for what it
        sees but may not change."""
        missing = ResourceNotFound(f"{current.resource_type}/{current.resource_id} is not known")
        if not await self._satisfies(current, self.visibility(resource, current.resource_type)):
            raise missing
        if write and not await self._satisfies(current, self._modifiability(resource)):
            raise Forbidden(
                f"{current.resource_type}/{current.resource_id} may be read but not changed by this organization"
            )

    async def _satisfies(self, current: StoredResource, clause: ColumnElement[bool] | None) -> bool:
        if clause is None:
            return True
        stmt = select(resource.c.rid).where(
            resource.c.resource_type == current.resource_type, resource.c.resource_id == current.resource_id, clause
        )
        return (await self.conn.execute(stmt)).first() is not None

    def defer_reference_checks(self) -> None:
        """Collect written bodies instead of checking their references at once.

        A transaction's entries may refer to each other in any order (a Patient PUT before the
        Organization PUT it points at), so their references are checked once every entry is
        written, by `check_deferred_references`, still inside the transaction.
        """
        self.deferred_references = []

    # --- reads ------------------------------------------------------------------------------

    def _require_type(self, resource_type: str) -> None:
        if resource_type not in self.config.resource_types:
            from fhirkit.errors import UnknownResourceType

            raise UnknownResourceType(f"Resource type '{resource_type[:64]}' is not served here")

    async def _current(self, resource_type: str, resource_id: str, *, for_update: bool = False) -> StoredResource | None:
        stmt = _CURRENT_FOR_UPDATE if for_update and self._is_postgres else _CURRENT
        return await self._current_by(stmt, resource_type, resource_id)

    async def _visible_current(self, resource_type: str, resource_id: str) -> StoredResource | None:
        """The current version if the caller may see it, in one statement (the hot read path):
        an invisible resource is None, exactly as a missing one."""
        clause = self.visibility(resource, resource_type)
        stmt = _CURRENT if clause is None else _current_where(clause)
        return await self._current_by(stmt, resource_type, resource_id)

    async def _current_by(self, stmt: Any, resource_type: str, resource_id: str) -> StoredResource | None:
        # On the driver: SQLAlchemy's per-execution cache key of the access condition cost more
        # than the read itself; the statement is compiled once per caller and grant-clock step (10 s) instead.
        rows = await driver.execute(self.conn, stmt, {"resource_type": resource_type, "resource_id": resource_id})
        return _stored_row(rows[0]) if rows else None

    async def read(self, resource_type: str, resource_id: str) -> StoredResource:
        self._require_type(resource_type)
        current = await self._visible_current(resource_type, resource_id)
        if current is None:
            raise ResourceNotFound(f"{resource_type}/{resource_id} is not known")
        if current.deleted:
            raise ResourceGone(
                f"{resource_type}/{resource_id} was deleted",
                headers={"ETag": current.etag, "Last-Modified": _http_date(current.last_updated)},
            )
        return current

    async def exists(self, resource_type: str, resource_id: str) -> bool:
        stmt = select(resource.c.rid).where(
            resource.c.resource_type == resource_type,
            resource.c.resource_id == resource_id,
            resource.c.deleted == false(),
        )
        return (await self.conn.execute(stmt)).first() is not None

    async def vread(self, resource_type: str, resource_id: str, version_id: str) -> StoredResource:
        self._require_type(resource_type)
        version = natural(version_id)
        if version is None:
            raise ResourceNotFound(f"{resource_type}/{resource_id} has no version '{version_id[:20]}'")
        current = await self._current(resource_type, resource_id)
        if current is None:
            raise ResourceNotFound(f"{resource_type}/{resource_id} is not known")
        await self._require_access(current)
        if version == current.version_id:  # the current row holds it (an append-only type's only one)
            if current.deleted:
                raise ResourceGone(f"Version {version_id} of {resource_type}/{resource_id} is a deletion")
            return current
        stmt = select(resource_history).where(
            resource_history.c.resource_type == resource_type,
            resource_history.c.resource_id == resource_id,
            resource_history.c.version_id == version,
        )
        row = (await self.conn.execute(stmt)).first()
        if row is None:
            raise ResourceNotFound(f"{resource_type}/{resource_id} has no version {version_id}")
        stored = _stored(row)
        if stored.deleted:
            raise ResourceGone(f"Version {version_id} of {resource_type}/{resource_id} is a deletion")
        return stored

    # --- writes -----------------------------------------------------------------------------

    async def create(
        self, body: dict[str, Any], *, if_none_exist: str | None = None, resource_id: str | None = None
    ) -> WriteOutcome:
        resource_type = body["resourceType"]
        self._require_type(resource_type)
        if if_none_exist:
            await self._lock(f"{resource_type}?{if_none_exist}")
            existing = await self.search_matches(resource_type, if_none_exist)
            if len(existing) > 1:
                raise MultipleMatches(f"If-None-Exist '{if_none_exist}' matches {len(existing)} resources")
            if existing:
                return WriteOutcome(existing[0], created=False, changed=False)
        new_id = resource_id or self.config.new_id(resource_type)
        return await self._insert(body, new_id, "POST")

    async def update(
        self, resource_type: str, resource_id: str, body: dict[str, Any], *, if_match: int | None = None
    ) -> WriteOutcome:
        self._require_type(resource_type)
        resources.check_id(resource_id)
        if body.get("id") != resource_id:
            raise InvalidRequest(
                f"The body's id '{str(body.get('id'))[:64]}' does not match the URL's id '{resource_id}'",
                expression=[f"{resource_type}.id"],
            )
        current = await self._current(resource_type, resource_id, for_update=True)
        if current is None:
            if if_match is not None:
                raise PreconditionFailed(f"{resource_type}/{resource_id} does not exist (If-Match given)")
            return await self._insert(body, resource_id, "PUT")
        await self._require_access(current, write=True)
        return await self._replace(current, body, if_match, "PUT", client_if_match=if_match)

    async def patch(
        self,
        resource_type: str,
        resource_id: str,
        apply: Callable[[dict[str, Any]], dict[str, Any]],
        *,
        if_match: int | None = None,
    ) -> WriteOutcome:
        current = await self.read(resource_type, resource_id)
        await self._require_access(current, write=True)
        _check_if_match(current, if_match)
        patched = apply(current.parsed())
        if not isinstance(patched, dict) or patched.get("resourceType") != resource_type:
            raise UnprocessableEntity("The patch changes the resource's type")
        if patched.get("id") != resource_id:
            raise UnprocessableEntity("The patch changes the resource's id")
        return await self._replace(current, patched, current.version_id, "PATCH", client_if_match=if_match)

    async def delete(self, resource_type: str, resource_id: str, *, if_match: int | None = None) -> StoredResource | None:
        self._require_type(resource_type)
        current = await self._current(resource_type, resource_id, for_update=True)
        if current is None or current.deleted:
            return None  # deleting what is not there succeeds (idempotent), as the spec allows
        await self._require_access(current, write=True)
        _check_if_match(current, if_match)
        context = WriteContext("delete", resource_type, resource_id, current.parsed(), self.in_transaction, if_match)
        hooks = self.config.hooks_for(resource_type)
        await hooks.before_write(self, None, context)
        stored = await self._write_version(current, None, "DELETE")
        async with driver.gathering(self.conn):
            await hooks.after_write(self, None, replace(context, stored=stored))
        return stored

    async def conditional_targets(self, resource_type: str, criteria: str) -> list[StoredResource]:
        self._require_type(resource_type)
        return await self.search_matches(resource_type, criteria)

    async def create_records(self, bodies: Sequence[dict[str, Any]]) -> list[tuple[str, bytes]]:
        """Store many resources the server wrote itself (audit records) in a few statements: no
        validation, reference checks or hooks, one multi-row insert per table for the batch.
        Returns each one's id and stored bytes, in order."""
        if not bodies:
            return []
        now = self._now()
        named = []
        for body in bodies:
            self._require_type(body["resourceType"])
            named.append({**body, "id": self.config.new_id(body["resourceType"])})
        rows = [self._first_version(body, now) for body in named]
        await self._create_rows_together(rows, named)
        return [(values["resource_id"], values["content"]) for values in rows]

    async def create_together(
        self, bodies: Sequence[dict[str, Any]], ids: Sequence[str], places: Sequence[str]
    ) -> list[WriteOutcome]:
        """New resources of one type, each given its id, written as a run: each validated and
        judged as `create` would, then all their rows in a few multi-row statements. For a
        transaction's consecutive creates whose hooks allow it (`hooks.creates_together`; see
        `BatchHooks` for what they see). `places`: where each body is in the request, for its errors."""
        resource_type = bodies[0]["resourceType"]
        self._require_type(resource_type)
        hooks = cast(BatchHooks, self.config.hooks_for(resource_type))
        named: list[dict[str, Any]] = []
        for body, resource_id, place in zip(bodies, ids, places, strict=True):
            with located(place):
                resources.check_id(resource_id)
                named.append({**body, "id": resource_id})
                await self._validate(named[-1])
        contexts = [WriteContext("create", resource_type, body["id"], None, self.in_transaction) for body in named]
        self.batch_memo = {}
        try:
            await hooks.before_creates(self, named)
            for body, context, place in zip(named, contexts, places):
                with located(place):
                    await hooks.before_write(self, body, context)
        finally:
            self.batch_memo = None
        now = self._now()
        rows = [self._first_version(body, now) for body in named]
        await self._create_rows_together(rows, named)
        stored = [StoredResource(resource_type, row["resource_id"], 1, now, False, row["content"], self.owner)
                  for row in rows]
        async with driver.gathering(self.conn):
            await hooks.after_creates(self, named, [replace(c, stored=s) for c, s in zip(contexts, stored)])
        return [WriteOutcome(one, created=True) for one in stored]

    def _first_version(self, body: dict[str, Any], now: int) -> dict[str, Any]:
        """A new resource's row (version 1, owned by this store's owner); `body` carries its id."""
        return {"resource_type": body["resourceType"], "resource_id": body["id"], "version_id": 1,
                "last_updated": now, "deleted": False, "owner": self.owner, "content": _content(body, 1, now)}

    async def _create_rows_together(self, rows: list[dict[str, Any]], bodies: list[dict[str, Any]]) -> None:
        """New resources' rows, first history rows and index rows: one multi-row insert per table."""
        inserted = dict(await driver.insert_rows(self.conn, resource, rows, returning=("resource_id", "rid"),
                                                 skip_conflicts=True))
        taken = [values["resource_id"] for values in rows if values["resource_id"] not in inserted]
        if taken:
            raise VersionConflict(f"{rows[0]['resource_type']}/{taken[0]} was created concurrently; retry")
        rids = [inserted[values["resource_id"]] for values in rows]
        await driver.insert_rows(self.conn, resource_history, [
            {"rid": rid, "method": "POST", **values} for rid, values in zip(rids, rows)
            if values["resource_type"] not in self.config.append_only])
        by_kind: dict[str, list[dict[str, Any]]] = {}
        for n, (rid, body) in enumerate(zip(rids, bodies), 1):
            for kind, index in _index_of(body).items():
                by_kind.setdefault(kind, []).extend({"rid": rid, **row} for row in index)
            if n % INDEX_YIELD_EVERY == 0:
                await asyncio.sleep(0)  # let other requests in (see INDEX_YIELD_EVERY)
        for kind, index in by_kind.items():
            await driver.insert_rows(self.conn, INDEX_TABLES[kind], index)

    async def _insert(self, body: dict[str, Any], resource_id: str, method: str) -> WriteOutcome:
        resource_type = body["resourceType"]
        resources.check_id(resource_id)
        body = {**body, "id": resource_id}
        context = WriteContext(
            "create" if method == "POST" else "update", resource_type, resource_id, None, self.in_transaction
        )
        await self._prepare(body, context)
        now = self._now()
        values = self._first_version(body, now)
        if not await self._create_rows(values, method, body):
            raise VersionConflict(f"{resource_type}/{resource_id} was created concurrently; retry")
        stored = StoredResource(resource_type, resource_id, 1, now, False, values["content"], self.owner)
        async with driver.gathering(self.conn):
            await self.config.hooks_for(resource_type).after_write(self, body, replace(context, stored=stored))
        return WriteOutcome(stored, created=True)

    async def _replace(
        self, current: StoredResource, body: dict[str, Any], if_match: int | None, method: str,
        *, client_if_match: int | None = None,
    ) -> WriteOutcome:
        _check_if_match(current, if_match)
        previous = None if current.deleted else current.parsed()
        if previous is not None and _same_content(previous, body):
            return WriteOutcome(current, created=False, changed=False)
        interaction = "patch" if method == "PATCH" else "update"
        context = WriteContext(
            interaction, current.resource_type, current.resource_id, previous, self.in_transaction, client_if_match
        )
        await self._prepare(body, context)
        if previous is not None and _same_content(previous, body):
            # The service's hooks filled in server-owned elements (a stamp, a default) and the
            # result is what is stored already: a re-send writes no new version.
            return WriteOutcome(current, created=False, changed=False)
        stored = await self._write_version(current, body, method)
        async with driver.gathering(self.conn):
            await self.config.hooks_for(current.resource_type).after_write(self, body, replace(context, stored=stored))
        return WriteOutcome(stored, created=current.deleted)

    async def _prepare(self, body: dict[str, Any], context: WriteContext) -> None:
        await self._validate(body)
        await self.config.hooks_for(context.resource_type).before_write(self, body, context)

    async def _validate(self, body: dict[str, Any]) -> None:
        """The body against its profile, and its references now or (in a transaction) later."""
        resources.validate(body)
        if self.config.check_references and self.deferred_references is not None:
            self.deferred_references.append(body)
        elif self.config.check_references:
            await self.check_references(body)

    async def _write_version(
        self, current: StoredResource, body: dict[str, Any] | None, method: str
    ) -> StoredResource:
        if current.resource_type in self.config.append_only:  # its first version has no history row to keep it
            raise Forbidden(f"{current.reference} cannot change: {current.resource_type} is append-only here")
        # What this transaction confirmed of the resource may no longer hold (it may be deleted,
        # or no longer visible).
        _forget_confirmed(self.conn, current.resource_type, current.resource_id)
        version = current.version_id + 1
        now = max(self._now(), current.last_updated + 1)
        content = _content(body, version, now) if body is not None else None
        updated = await driver.execute(self.conn, _NEXT_VERSION, {
            "b_type": current.resource_type, "b_id": current.resource_id, "b_seen": current.version_id,
            "b_version": version, "b_updated": now, "b_deleted": body is None, "b_content": content,
        })
        rid = updated[0][0] if updated else None
        if rid is None:
            raise PreconditionFailed(
                f"{current.resource_type}/{current.resource_id} was changed concurrently "
                f"(version {current.version_id} is no longer current)"
            )
        values = {
            "resource_type": current.resource_type,
            "resource_id": current.resource_id,
            "version_id": version,
            "last_updated": now,
            "deleted": body is None,
            "owner": current.owner,
            "content": content,
        }
        await self._clear_indexes(rid)
        await self._write_rows(rid, values, method, _index_of(body))
        return StoredResource(
            current.resource_type, current.resource_id, version, now, body is None, content, current.owner
        )

    async def _create_rows(self, values: dict[str, Any], method: str, body: dict[str, Any]) -> bool:
        """A new resource's row, history row and index rows; False when the id exists already.
        ON CONFLICT DO NOTHING: a concurrent create of the same id answers no row (no savepoint)."""
        index = _index_of(body)
        history = values["resource_type"] not in self.config.append_only
        if self._in_one_statement(index):  # as `_write_rows` does for a new version
            statement, parameters = _created_at_once(values, method, index, history=history)
            return bool(await driver.execute(self.conn, statement, parameters))
        inserted = await driver.execute(self.conn, _insert_resource(self._is_postgres), values)
        if not inserted:
            return False
        if history:
            await self._write_rows(inserted[0][0], values, method, index)
        else:
            await self._write_index(inserted[0][0], index)
        return True

    def _in_one_statement(self, index: dict[str, list[dict[str, Any]]]) -> bool:
        """Whether a version's rows go to PostgreSQL in one round trip: each statement costs
        ~170 µs of client CPU there."""
        return self._is_postgres and sum(map(len, index.values())) <= MAX_ROWS_AT_ONCE

    async def _write_rows(
        self, rid: int, values: dict[str, Any], method: str, index: dict[str, list[dict[str, Any]]]
    ) -> None:
        """A version's history row and its index rows (`_index_of` its body; none for a deletion)."""
        if self._in_one_statement(index):
            statement, parameters = _rows_at_once(rid, {"rid": rid, "method": method, **values}, index)
            await driver.execute(self.conn, statement, parameters)
            return
        await self._append_history(rid, values, method)
        await self._write_index(rid, index)

    async def _write_index(self, rid: int, index: dict[str, list[dict[str, Any]]]) -> None:
        for kind, rows in index.items():
            await driver.execute_many(self.conn, _INSERT_INDEX[kind], [{"rid": rid, **row} for row in rows])

    async def _append_history(self, rid: int, values: dict[str, Any], method: str) -> None:
        await driver.execute(self.conn, _INSERT_HISTORY, {"rid": rid, "method": method, **values})

    async def _clear_indexes(self, rid: int) -> None:
        if self._is_postgres:  # one round trip: each statement costs ~170 µs of client CPU there
            await driver.execute(self.conn, _CLEAR_INDEXES_AT_ONCE, {"rid": rid})
            return
        for statement in _CLEAR_INDEXES:
            await driver.execute(self.conn, statement, {"rid": rid})

    async def _lock(self, key: str) -> None:
        # Conditional creates must not race into duplicates. SQLite writers are already
        # serialised (BEGIN IMMEDIATE); PostgreSQL takes a transaction-scoped advisory lock.
        if self._is_postgres:
            await self.conn.execute(select(func.pg_advisory_xact_lock(func.hashtext(key))))

    def _now(self) -> int:
        return self.config.clock()

    # --- references -------------------------------------------------------------------------

    async def check_references(self, body: dict[str, Any], targets: "ReferenceTargets | None" = None) -> None:
        """A reference to a missing resource of a type the product holds is refused (422).
        `targets`: the body's, as `prefetch_references` found them."""
        local, foreign = targets if targets is not None else self._targets(body)
        foreign = dict(foreign)
        missing = await self._missing_local(local)
        # A type several services hold (ServiceRequest, Task, Provenance) may live at another owner.
        foreign.update((key, written) for key, written in missing.items() if self.config.references.holds(key[0]))
        missing = {key: written for key, written in missing.items() if key not in foreign}
        for key, written in foreign.items():
            if not await self.config.references.exists(*key):
                missing[key] = written
        if missing:
            (target_type, target_id), reference = next(iter(missing.items()))
            path = _path_of(body, reference)
            raise UnprocessableEntity(
                f"{path} refers to {target_type}/{target_id}, which does not exist",
                expression=[path],
            )

    async def prefetch_references(self, bodies: Sequence[dict[str, Any]]) -> list["ReferenceTargets"]:
        """Ask other services about the targets of many bodies at once (a transaction's hundred
        results name up to a hundred patients), so that each body's check finds them answered.
        Only a speed-up: whatever is not answered here is asked one by one as before. Returns
        each body's targets, for its `check_references`."""
        targets = [self._targets(body) for body in bodies]
        exists_many = getattr(self.config.references, "exists_many", None)
        wanted = {key for _, foreign in targets for key in foreign}
        if exists_many is not None and len(wanted) > 1:
            await exists_many(wanted)
        return targets

    def _targets(self, body: dict[str, Any]) -> "ReferenceTargets":
        """The body's references to check, by (type, id), each with its first mention as
        written: those this store holds, and those other services hold."""
        local: dict[tuple[str, str], str] = {}
        foreign: dict[tuple[str, str], str] = {}
        for _, reference in _references(_outside_entries(body), []):
            parts = indexing.split_reference(reference)
            target_type, target_id = parts["target_type"], parts["target_id"]
            if target_type is None or target_id is None or reference.startswith(("http:", "https:", "urn:")):
                continue
            key = (target_type, target_id)
            if (target_type, target_id) == (body["resourceType"], body.get("id")):
                continue  # a resource may point at itself
            if target_type in self.config.resource_types:
                local.setdefault(key, reference)
            elif self.config.references.holds(target_type):
                foreign.setdefault(key, reference)
        return local, foreign

    async def _missing_local(self, wanted: dict[tuple[str, str], str]) -> dict[tuple[str, str], str]:
        """The wanted references that are absent or invisible to the caller. What one entry of a
        bundle confirmed is not asked again for the next (a hundred results naming one
        VerificationResult): confirmations last for the transaction, keyed by the caller."""
        confirmed = driver.transaction_memo(self.conn, _CONFIRMED)
        caller = id(self.caller)
        keys = [key for key in wanted if (caller, *key) not in confirmed]
        if not keys:
            return {}
        # A reference to what the caller may not see is refused as if it did not exist: the
        # answer must not tell it apart from a missing resource.
        visible = self.visibility(resource)
        stmt = select(resource.c.resource_type, resource.c.resource_id).where(
            tuple_(resource.c.resource_type, resource.c.resource_id).in_(keys),
            resource.c.deleted == false(),
            *([visible] if visible is not None else []),
        )
        found = {(row[0], row[1]) for row in await self.conn.execute(stmt)}
        confirmed.update(((caller, *key), True) for key in found)
        return {key: wanted[key] for key in keys if key not in found}

    # --- search -----------------------------------------------------------------------------

    async def search_matches(self, resource_type: str, criteria: str) -> list[StoredResource]:
        """Everything matching a conditional interaction's criteria (at most a few)."""
        from urllib.parse import parse_qsl

        params = parse_qsl(criteria.lstrip("?"), keep_blank_values=True)
        if not params:
            raise InvalidRequest("Conditional criteria are empty")
        request = parse_search(resource_type, params)
        if not request.filters:
            # `DELETE Patient?_count=1` must not match (and delete) every patient.
            raise InvalidRequest(
                f"Conditional criteria '{criteria[:120]}' name no search parameter; they would match everything"
            )
        request.count, request.total, request.sort = 2, "none", []
        request.includes, request.revincludes = [], []
        page = await self.search(request)
        return page.matches

    async def search(self, request: SearchRequest) -> SearchPage:
        self._require_type(request.resource_type)
        for flt in request.filters:
            self._require_local(flt)
        with driver.planned_for_values(self.conn):
            return await self._search(request)

    async def _search(self, request: SearchRequest) -> SearchPage:
        target = _SEARCH_TARGET
        key = query.template_key(request)
        if key is not None:  # built once per shape of search and caller's condition, values bound
            base, page = self._template(key, target, request)
            values = query.template_values(request)
        else:
            base, page, values = query.base_search(target, request, self._search_visibility(request)), None, {}
        if request.summary == "count" or request.count == 0:
            return SearchPage([], [], await self._total(base, values), None, None)
        matches, next_cursor, previous_cursor = await self._page(target, base, request, page, values)
        total = None
        if request.total != "none":
            # A first page that holds every match is its own count: most searches need no COUNT.
            whole = request.cursor is None and next_cursor is None
            total = len(matches) if whole else await self._total(base, values)
        warnings: list[str] = []
        included = await self._included(matches, request, warnings)
        return SearchPage(matches, included, total, next_cursor, previous_cursor, warnings)

    def _require_local(self, flt: Filter | HasFilter) -> None:
        """Chains and `_has` run on this service's tables: a type held elsewhere would silently
        match nothing, so it is refused with a message saying what to do instead."""
        if isinstance(flt, HasFilter):
            if flt.source_type not in self.config.resource_types:
                raise NotSupported(
                    f"_has:{flt.source_type} is not supported here: {flt.source_type} is held by another "
                    f"service. Search {flt.source_type} first, then use the references it holds."
                )
            self._require_local(flt.inner)
        elif flt.chain is not None:
            if flt.chain_type not in self.config.resource_types:
                raise NotSupported(
                    f"Chained search '{flt.name}:{flt.chain_type}.…' is not supported: {flt.chain_type} is held "
                    f"by another service. Search {flt.chain_type} first, then {flt.resource_type}?{flt.name}=…"
                    f" with the ids found."
                )
            self._require_local(flt.chain)

    def _search_visibility(self, request: SearchRequest) -> Callable[[Any], Any]:
        """The condition for each alias of a search: the searched alias's rows are of the
        searched type; a chain's or `_has`'s are not."""
        return lambda target: self.visibility(target, request.resource_type if target is _SEARCH_TARGET else None)

    def _template(self, key: tuple[Any, ...], target: Any, request: SearchRequest) -> tuple[Any, Any]:
        """The base and first-page statements of a search's shape for this caller's condition
        (the same object for the grant clock's step), built once and run on the driver."""
        visible = self.visibility(target, request.resource_type)
        found = _TEMPLATES.get((key, id(visible)))
        if found is not None and found[0] is visible:
            return found[1], found[2]
        if len(_TEMPLATES) > 512:
            _TEMPLATES.clear()
        base = query.template_search(target, request, visible)
        page = _page_statement(target, base, request, None)
        _TEMPLATES[(key, id(visible))] = (visible, base, page)
        return base, page

    async def _total(self, base: Any, values: dict[str, Any]) -> int:
        stmt = select(func.count()).select_from(base.subquery())
        return int((await self.conn.execute(stmt, values)).scalar_one())

    async def _page(
        self, target: Any, base: Any, request: SearchRequest, page: Any, values: dict[str, Any]
    ) -> tuple[list[StoredResource], str | None, str | None]:
        """The page's matches and the cursors to the next and previous pages. `page`: the first
        page's statement built from a template (run with `values`), else it is built here."""
        cursor = query.Cursor.decode(request.cursor) if request.cursor else None
        backward = bool(cursor and cursor.backward)
        if page is not None:
            rows = await driver.execute(self.conn, page, values)
        else:
            rows = list(await self.conn.execute(_page_statement(target, base, request, cursor)))
        more = len(rows) > request.count
        rows = rows[: request.count]
        if backward:
            rows.reverse()
        keys = [tuple(row[6:]) for row in rows]
        matches = [
            StoredResource(row[0], row[1], row[2], row[3], False, row[4], row[5]) for row in rows
        ]
        if not rows:
            return matches, None, None
        has_next = more if not backward else True
        has_previous = (cursor is not None) if not backward else more
        next_cursor = query.Cursor(keys[-1], False).encode() if has_next else None
        previous_cursor = query.Cursor(keys[0], True).encode() if has_previous else None
        return matches, next_cursor, previous_cursor

    async def _included(
        self, matches: list[StoredResource], request: SearchRequest, warnings: list[str]
    ) -> list[StoredResource]:
        if not matches or not (request.includes or request.revincludes):
            return []
        seen = {(m.resource_type, m.resource_id) for m in matches}
        included: list[StoredResource] = []
        frontier = matches
        elsewhere: set[tuple[str, str]] = set()  # (include, type held by another service)
        for iteration in range(MAX_INCLUDE_ITERATIONS):
            found: list[StoredResource] = []
            for include in request.includes:
                if iteration == 0 or include.iterate:
                    found += await self._forward(frontier, include, elsewhere)
            for include in request.revincludes:
                if iteration == 0 or include.iterate:
                    if include.source_type not in self.config.resource_types:
                        elsewhere.add((f"_revinclude={include.source_type}:{include.param}", include.source_type))
                        continue
                    found += await self._reverse(frontier, include)
            fresh = [f for f in found if (f.resource_type, f.resource_id) not in seen]
            for item in fresh:
                seen.add((item.resource_type, item.resource_id))
            included += fresh
            if not fresh or len(included) >= MAX_INCLUDED:
                break
            frontier = fresh
        # Includes are best effort (the spec lets a server leave some out), but the client is told.
        warnings += [
            f"{what}: {held} resources are held by another service and are not included; read them separately"
            for what, held in sorted(elsewhere)
        ]
        return included[:MAX_INCLUDED]

    async def _forward(
        self, sources: Sequence[StoredResource], include: Include, elsewhere: set[tuple[str, str]]
    ) -> list[StoredResource]:
        rids = await self._rids([s for s in sources if s.resource_type == include.source_type])
        if not rids:
            return []
        refs = select(reference_index.c.target_type, reference_index.c.target_id).where(
            reference_index.c.rid.in_(rids),
            reference_index.c.param == include.param,
            reference_index.c.target_id.is_not(None),
        )
        if include.target_type:
            refs = refs.where(reference_index.c.target_type == include.target_type)
        targets = {(row[0], row[1]) for row in await self.conn.execute(refs)}
        what = f"_include={include.source_type}:{include.param}"
        elsewhere.update((what, t[0]) for t in targets if t[0] not in self.config.resource_types)
        return await self._fetch({t for t in targets if t[0] in self.config.resource_types})

    async def _reverse(self, targets: Sequence[StoredResource], include: Include) -> list[StoredResource]:
        keys = [(t.resource_type, t.resource_id) for t in targets]
        if not keys or include.source_type not in self.config.resource_types:
            return []
        source = resource.alias("src")
        stmt = (
            select(source.c.resource_type, source.c.resource_id)
            .join(reference_index, reference_index.c.rid == source.c.rid)
            .where(
                reference_index.c.resource_type == include.source_type,
                reference_index.c.param == include.param,
                tuple_(reference_index.c.target_type, reference_index.c.target_id).in_(keys),
                source.c.deleted == false(),
            )
            .limit(MAX_INCLUDED)
        )
        return await self._fetch({(row[0], row[1]) for row in await self.conn.execute(stmt)})

    async def _rids(self, items: Sequence[StoredResource]) -> list[int]:
        if not items:
            return []
        keys = [(i.resource_type, i.resource_id) for i in items]
        stmt = select(resource.c.rid).where(tuple_(resource.c.resource_type, resource.c.resource_id).in_(keys))
        return [row[0] for row in await self.conn.execute(stmt)]

    async def _fetch(self, keys: Iterable[tuple[str, str]]) -> list[StoredResource]:
        keys = list(keys)[:MAX_INCLUDED]
        if not keys:
            return []
        target = resource.alias("inc")
        conditions = [
            tuple_(target.c.resource_type, target.c.resource_id).in_(keys),
            target.c.deleted == false(),
        ]
        visible = self.visibility(target)
        if visible is not None:
            conditions.append(visible)
        stmt = select(target).where(*conditions)
        return [_stored(row) for row in await self.conn.execute(stmt)]

    # --- history ----------------------------------------------------------------------------

    async def history(
        self,
        resource_type: str | None,
        resource_id: str | None,
        *,
        count: int,
        since: int | None,
        cursor: str | None,
        at: tuple[int, int] | None = None,
    ) -> tuple[list[StoredResource], str | None]:
        """Versions newest first; returns the page and the cursor of the next (opaque: a history
        row id, a resource row id for an append-only type, both for a store-wide history of a
        store holding one). `at` (an inclusive range, `_at`) keeps the versions current at some
        moment of it. An append-only type's versions are its resource rows (`StoreConfig.append_only`)."""
        if resource_type is not None:
            self._require_type(resource_type)
        if resource_id is not None:
            current = await self._current(resource_type or "", resource_id)
            if current is None:
                raise ResourceNotFound(f"{resource_type}/{resource_id} is not known")
            await self._require_access(current)
            if current.resource_type in self.config.append_only:
                kept = _written_within(current.last_updated, since, at)
                return ([replace(current, method="POST")] if kept else []), None
        if resource_type in self.config.append_only:
            written = await self._append_only_page([resource_type], count, since, at, natural(cursor or ""))
            return _page_of(written, count)
        append_only = sorted(self.config.append_only & self.config.resource_types)
        if resource_type is None and append_only:
            return await self._store_history(append_only, count, since, at, cursor)
        versions = await self._versions_page(resource_type, resource_id, count, since, at, natural(cursor or ""))
        return _page_of(versions, count)

    async def _versions_page(
        self, resource_type: str | None, resource_id: str | None, count: int, since: int | None,
        at: tuple[int, int] | None, before: int | None,
    ) -> list[tuple[int, StoredResource]]:
        """Up to `count + 1` history rows, newest first, each with its history row id."""
        stmt = select(resource_history)
        if resource_type is not None:
            stmt = stmt.where(resource_history.c.resource_type == resource_type)
        elif self.config.append_only:  # rows such a type had before it was append-only: its resource rows list it
            stmt = stmt.where(resource_history.c.resource_type.not_in(sorted(self.config.append_only)))
        if resource_id is not None:
            stmt = stmt.where(resource_history.c.resource_id == resource_id)
        else:
            holder = resource.alias("holder")
            visible = self.visibility(holder)
            if visible is not None:
                stmt = stmt.where(resource_history.c.rid.in_(select(holder.c.rid).where(visible)))
        if since is not None:
            stmt = stmt.where(resource_history.c.last_updated >= since)
        if at is not None:
            stmt = stmt.where(*_current_during(*at))
        if before is not None:
            stmt = stmt.where(resource_history.c.hid < before)
        stmt = stmt.order_by(resource_history.c.hid.desc()).limit(count + 1)
        return [(row.hid, _stored(row)) for row in await self.conn.execute(stmt)]

    async def _append_only_page(
        self, types: list[str], count: int, since: int | None, at: tuple[int, int] | None, before: int | None,
    ) -> list[tuple[int, StoredResource]]:
        """Up to `count + 1` resources of append-only types, newest first, each with its row id:
        each is its one version, current from when it was written on."""
        stmt = select(resource).where(resource.c.resource_type.in_(types))
        visible = self.visibility(resource, types[0] if len(types) == 1 else None)
        if visible is not None:
            stmt = stmt.where(visible)
        if since is not None:
            stmt = stmt.where(resource.c.last_updated >= since)
        if at is not None:
            stmt = stmt.where(resource.c.last_updated <= at[1])
        if before is not None:
            stmt = stmt.where(resource.c.rid < before)
        stmt = stmt.order_by(resource.c.rid.desc()).limit(count + 1)
        return [(row.rid, replace(_stored(row), method="POST")) for row in await self.conn.execute(stmt)]

    async def _store_history(
        self, append_only: list[str], count: int, since: int | None, at: tuple[int, int] | None, cursor: str | None,
    ) -> tuple[list[StoredResource], str | None]:
        """The whole store's history when some types are append-only: the history rows and those
        types' resource rows, merged newest first. The cursor is where each of the two stands
        (`<history row id>.<resource row id>`, a side left empty until the pages take from it)."""
        if count <= 0:
            return [], None
        versions_at, _, written_at = (cursor or "").partition(".")
        versions_before, written_before = natural(versions_at), natural(written_at)
        versions = await self._versions_page(None, None, count, since, at, versions_before)
        written = await self._append_only_page(append_only, count, since, at, written_before)
        page: list[StoredResource] = []
        while len(page) < count and (versions or written):
            newer_version = bool(versions) and (not written or versions[0][1].last_updated >= written[0][1].last_updated)
            key, stored = (versions if newer_version else written).pop(0)
            if newer_version:
                versions_before = key
            else:
                written_before = key
            page.append(stored)
        if not versions and not written:
            return page, None
        return page, f"{versions_before or ''}.{written_before or ''}"


def _page_of(rows: list[tuple[int, StoredResource]], count: int) -> tuple[list[StoredResource], str | None]:
    """A page of `count` from `count + 1` keyed rows, and the cursor of the next (the last row's key)."""
    next_cursor = str(rows[count - 1][0]) if len(rows) > count > 0 else None
    return [stored for _, stored in rows[:count]], next_cursor


def _written_within(last_updated: int, since: int | None, at: tuple[int, int] | None) -> bool:
    """Whether an append-only resource's one version passes `_since` and `_at`."""
    return (since is None or last_updated >= since) and (at is None or last_updated <= at[1])


def _current_during(low: int, high: int) -> list[ColumnElement[bool]]:
    """A version was current at some moment of [low, high]: written by `high`, and its resource
    had no later version yet at `low` (versions are written in time order)."""
    later = resource_history.alias("later")
    return [
        resource_history.c.last_updated <= high,
        ~exists(select(later.c.hid).where(
            later.c.rid == resource_history.c.rid,
            later.c.version_id > resource_history.c.version_id,
            later.c.last_updated <= low,
        )),
    ]


# Statements of the hot paths, built once (building one per call cost more than running it).
_CURRENT = select(resource).where(
    resource.c.resource_type == bindparam("resource_type"), resource.c.resource_id == bindparam("resource_id")
)
_CURRENT_FOR_UPDATE = _CURRENT.with_for_update()
_INSERT_HISTORY = insert(resource_history)
_SEARCH_TARGET = resource.alias(SEARCH_ALIAS)  # one object, so the access condition on it is reused
_NEXT_VERSION = (
    update(resource)
    .where(
        resource.c.resource_type == bindparam("b_type"),
        resource.c.resource_id == bindparam("b_id"),
        resource.c.version_id == bindparam("b_seen"),
    )
    .values(
        version_id=bindparam("b_version"), last_updated=bindparam("b_updated"),
        deleted=bindparam("b_deleted"), content=bindparam("b_content"),
    )
    .returning(resource.c.rid)
)
_INSERT_INDEX = {kind: insert(table) for kind, table in INDEX_TABLES.items()}
_CLEAR_INDEXES = [delete(table).where(table.c.rid == bindparam("rid")) for table in INDEX_TABLES.values()]
# PostgreSQL: the same deletes as one statement (data-modifying CTEs, one per index table).
_CLEAR_INDEXES_AT_ONCE = _CLEAR_INDEXES[-1].add_cte(
    *(statement.cte(f"clear_{kind}") for kind, statement in zip(INDEX_TABLES, _CLEAR_INDEXES[:-1]))
)
_INSERT_RESOURCE = {
    dialect: module.insert(resource).on_conflict_do_nothing().returning(resource.c.rid)
    for dialect, module in (("postgresql", postgresql), ("sqlite", sqlite))
}


# (template key, id of the caller's condition) → (the condition, base statement, first page's).
_TEMPLATES: dict[tuple[Any, int], tuple[Any, Any, Any]] = {}


def _page_statement(target: Any, base: Any, request: SearchRequest, cursor: "query.Cursor | None") -> Any:
    """A page of `base`: the stored rows and their sort keys, in order, one more than asked for."""
    components = query.sort_components(target, request.sort)
    columns = [
        target.c.resource_type, target.c.resource_id, target.c.version_id, target.c.last_updated,
        target.c.content, target.c.owner, *[expression for expression, _ in components],
    ]
    stmt = base.with_only_columns(*columns)
    if cursor is not None:
        stmt = stmt.where(query.keyset_clause(components, cursor))
    return query.ordered(stmt, components, bool(cursor and cursor.backward)).limit(request.count + 1)


_READS_BY_CLAUSE: dict[int, tuple[Any, Any]] = {}


def _current_where(clause: ColumnElement[bool]) -> Any:
    """The read-by-id statement with an access condition. The policy hands out the same condition
    object per caller for a second, so the statement is built once for all of that caller's reads.
    (Keyed by identity: SQL expressions overload `==`, so they cannot be dictionary keys.)"""
    found = _READS_BY_CLAUSE.get(id(clause))
    if found is not None and found[0] is clause:
        return found[1]
    if len(_READS_BY_CLAUSE) > 512:
        _READS_BY_CLAUSE.clear()
    statement = _CURRENT.where(clause)
    _READS_BY_CLAUSE[id(clause)] = (clause, statement)
    return statement


# Indexing many new resources at once (an audit batch, a bundle's run of creates) lets other
# requests in every few resources: in one go it held the event loop for milliseconds.
INDEX_YIELD_EVERY = 8
MAX_ROWS_AT_ONCE = 1000  # index rows written in one statement (PostgreSQL takes 65,535 parameters)
_HISTORY_KEYS = ("rid", "method", "resource_type", "resource_id", "version_id", "last_updated", "deleted", "owner",
                 "content")
_ROWS_AT_ONCE: dict[tuple[tuple[str, int], ...], Any] = {}


def _rows_at_once(
    rid: int, history: dict[str, Any], index: dict[str, list[dict[str, Any]]]
) -> tuple[Any, dict[str, Any]]:
    """PostgreSQL: the history row and every index row as one statement (data-modifying CTEs),
    built once per shape (how many rows of each kind) and kept."""
    shape = tuple((kind, len(rows)) for kind, rows in index.items())
    statement = _ROWS_AT_ONCE.get(shape)
    if statement is None:
        if len(_ROWS_AT_ONCE) > 2048:
            _ROWS_AT_ONCE.clear()
        history_insert = insert(resource_history).values({key: bindparam(f"h_{key}") for key in _HISTORY_KEYS})
        inserts = [insert(INDEX_TABLES[kind]).values([
            {column: bindparam(f"{kind}{i}_{column}") for column in INDEX_TABLES[kind].c.keys()} for i in range(count)
        ]) for kind, count in shape]
        statement = history_insert.add_cte(*(step.cte(f"write_{kind}") for step, (kind, _) in zip(inserts, shape)))
        _ROWS_AT_ONCE[shape] = statement
    parameters = {f"h_{key}": history[key] for key in _HISTORY_KEYS}
    for kind, rows in index.items():
        columns = INDEX_TABLES[kind].c.keys()
        for i, row in enumerate(rows):
            parameters.update({f"{kind}{i}_{column}": rid if column == "rid" else row.get(column)
                               for column in columns})
    return statement, parameters


_RESOURCE_KEYS = _HISTORY_KEYS[2:]  # what the resource row and its first history row share
_CREATED_AT_ONCE: dict[tuple[tuple[tuple[str, int], ...], bool], Any] = {}


def _created_at_once(
    values: dict[str, Any], method: str, index: dict[str, list[dict[str, Any]]], *, history: bool = True
) -> tuple[Any, dict[str, Any]]:
    """PostgreSQL: a new resource's row, its history row (unless `history` is False: an
    append-only type) and its index rows as one statement, the later rows taking the `rid` the
    first one gets (data-modifying CTEs); it answers that `rid`, or no row when the id exists
    already. Built once per shape (how many rows of each kind)."""
    shape = tuple((kind, len(rows)) for kind, rows in index.items())
    statement = _CREATED_AT_ONCE.get((shape, history))
    if statement is None:
        if len(_CREATED_AT_ONCE) > 2048:
            _CREATED_AT_ONCE.clear()
        statement = _CREATED_AT_ONCE[(shape, history)] = text(_created_at_once_sql(shape, history))
    parameters = {f"r_{key}": values[key] for key in _RESOURCE_KEYS}
    if history:
        parameters["h_method"] = method
    for kind, rows in index.items():
        columns = _INDEX_VALUE_COLUMNS[kind]
        for i, row in enumerate(rows):
            parameters.update({f"{kind}{i}_{column}": row.get(column) for column in columns})
    return statement, parameters


def _created_at_once_sql(shape: tuple[tuple[str, int], ...], history: bool) -> str:
    def typed(name: str, column: Any) -> str:
        # Every value carries its type: rows in a VALUES list have no column to take one from.
        # Text goes as unbounded VARCHAR, so an over-long value fails as on a plain insert.
        kind = "VARCHAR" if isinstance(column.type, String) else column.type.compile(dialect=postgresql.dialect())
        return f"CAST(:{name} AS {kind})"

    given = ", ".join(typed(f"r_{key}", resource.c[key]) for key in _RESOURCE_KEYS)
    steps = [
        f"new AS (INSERT INTO {resource.name} ({', '.join(_RESOURCE_KEYS)}) VALUES ({given}) "
        "ON CONFLICT DO NOTHING RETURNING rid)",
    ]
    if history:
        steps.append(f"write_history AS (INSERT INTO {resource_history.name} ({', '.join(_HISTORY_KEYS)}) "
                     f"SELECT rid, {typed('h_method', resource_history.c.method)}, {given} FROM new)")
    for kind, count in shape:
        table, columns = INDEX_TABLES[kind], _INDEX_VALUE_COLUMNS[kind]
        rows = ", ".join("(" + ", ".join(typed(f"{kind}{i}_{column}", table.c[column]) for column in columns) + ")"
                         for i in range(count))
        names = ", ".join(f"v{j}" for j in range(len(columns)))
        steps.append(f"write_{kind} AS (INSERT INTO {table.name} (rid, {', '.join(columns)}) "
                     f"SELECT new.rid, {names} FROM new, (VALUES {rows}) AS v({names}))")
    return f"WITH {', '.join(steps)} SELECT rid FROM new"


_INDEX_VALUE_COLUMNS = {kind: tuple(name for name in table.c.keys() if name != "rid")
                        for kind, table in INDEX_TABLES.items()}


def _index_of(body: dict[str, Any] | None) -> dict[str, list[dict[str, Any]]]:
    """A version's index rows by kind, kinds without rows left out; none for a deletion."""
    return {kind: rows for kind, rows in indexing.index_rows(body).items() if rows} if body is not None else {}


def _insert_resource(is_postgres: bool) -> Any:
    return _INSERT_RESOURCE["postgresql" if is_postgres else "sqlite"]


def _stored(row: Any) -> StoredResource:
    mapping = row._mapping
    return StoredResource(
        mapping["resource_type"],
        mapping["resource_id"],
        mapping["version_id"],
        mapping["last_updated"],
        mapping["deleted"],
        mapping["content"],
        mapping["owner"],
        mapping.get("method"),
    )


_COLUMN = {column.name: index for index, column in enumerate(resource.c)}


def _stored_row(row: tuple[Any, ...]) -> StoredResource:
    """A `fhir_resource` row as the driver returns it (a tuple in the table's column order)."""
    return StoredResource(
        row[_COLUMN["resource_type"]], row[_COLUMN["resource_id"]], row[_COLUMN["version_id"]],
        row[_COLUMN["last_updated"]], bool(row[_COLUMN["deleted"]]), row[_COLUMN["content"]],
        row[_COLUMN["owner"]], None,
    )


def _check_if_match(current: StoredResource, if_match: int | None) -> None:
    if if_match is not None and if_match != current.version_id:
        raise PreconditionFailed(
            f"{current.resource_type}/{current.resource_id} is at version {current.version_id}, "
            f"not {if_match} (If-Match)"
        )


def _content(body: dict[str, Any], version: int, now: int) -> bytes:
    """The client's JSON with the server's `meta.versionId`/`lastUpdated`; resourceType, id and
    meta lead, as readers expect, and everything else stays as sent."""
    meta = dict(body.get("meta") or {})
    meta["versionId"] = str(version)
    meta["lastUpdated"] = format_instant(now)
    stored = {"resourceType": body["resourceType"], "id": body["id"], "meta": meta}
    stored.update((key, value) for key, value in body.items() if key not in stored)
    return jsonio.dumps(stored)


def _same_content(previous: dict[str, Any], body: dict[str, Any]) -> bool:
    def strip(item: dict[str, Any]) -> dict[str, Any]:
        meta = {k: v for k, v in (item.get("meta") or {}).items() if k not in SERVER_META}
        rest = {k: v for k, v in item.items() if k != "meta"}
        return {**rest, "meta": meta} if meta else rest

    return strip(previous) == strip(body)


_CONFIRMED = "confirmed-references"  # (id of the caller, type, id) seen present and visible


def _forget_confirmed(conn: AsyncConnection, resource_type: str, resource_id: str) -> None:
    confirmed = driver.transaction_memo(conn, _CONFIRMED)
    for key in [k for k in confirmed if k[1:] == (resource_type, resource_id)]:
        del confirmed[key]


def _outside_entries(body: dict[str, Any]) -> dict[str, Any]:
    """A stored Bundle (a document, a collection, a message) carries its entries as they are:
    their references resolve inside the Bundle or at the servers of the entries' fullUrls, not in
    this store, so only the Bundle's own references are checked."""
    if body["resourceType"] != "Bundle" or not isinstance(body.get("entry"), list):
        return body
    entries = [
        {k: v for k, v in entry.items() if k != "resource"} if isinstance(entry, dict) else entry
        for entry in body["entry"]
    ]
    return {**body, "entry": entries}


# A body's references (type, id) → the first that names it, as written.
ReferenceTargets = tuple[dict[tuple[str, str], str], dict[tuple[str, str], str]]


def _references(value: Any, found: list[tuple[str, str]], path: str = "") -> list[tuple[str, str]]:
    """The literal references in `value` in document order (contained `#id` ones left out), each
    with its path when `path` names `value` (else ""): building a path per element cost half of
    the walk, and only a refusal names one (`_path_of`)."""
    if isinstance(value, dict):
        reference = value.get("reference")
        if isinstance(reference, str) and not reference.startswith("#"):
            found.append((path and f"{path}.reference", reference))
        for key, child in value.items():
            if isinstance(child, dict | list) and key != "reference":
                _references(child, found, path and f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _references(item, found, path and f"{path}[{index}]")
    return found


def _path_of(body: dict[str, Any], reference: str) -> str:
    """Where `reference` is first written in `body`, as `Observation.subject.reference`."""
    written = _references(_outside_entries(body), [], body["resourceType"])
    return next(path for path, found in written if found == reference)


def _http_date(micros: int) -> str:
    from email.utils import formatdate

    return formatdate(micros / 1_000_000, usegmt=True)


__all__ = [
    "FhirError",
    "Repository",
    "SearchPage",
    "StoreConfig",
    "StoredResource",
    "WriteOutcome",
    "now_micros",
]

"""`batch` and `transaction` Bundles (https://hl7.org/fhir/R4/http.html#transaction).

A transaction runs every entry in the request's one database transaction: entries are processed
in the spec's order (DELETE, POST, PUT/PATCH, GET), `urn:uuid` full URLs and conditional
references are resolved first, and any failure rolls everything back and answers with the
failing entry's error. A batch runs each entry on its own savepoint and reports each outcome.

A transaction spanning services reaches each service as a piece (`fhirkit.api.compensation`):
its entries keep their indexes in the client's Bundle (errors name those), creates may come with
ids the gateway chose, and a dry run executes everything and rolls it back.
"""

from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from fhirkit import resources
from fhirkit.api import interactions, responses
from fhirkit.api.interactions import RequestOptions, Result
from fhirkit.errors import (
    FhirError,
    InvalidRequest,
    MultipleMatches,
    PayloadTooLarge,
    UnprocessableEntity,
    located,
)
from fhirkit.search.values import format_instant
from fhirkit.store.hooks import creates_together
from fhirkit.store.repository import Repository

MAX_ENTRIES = 1000
METHOD_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}


@dataclass
class Entry:
    index: int
    method: str
    resource_type: str
    resource_id: str | None
    query: str
    full_url: str | None
    resource: Any
    if_match: int | None
    if_none_exist: str | None
    matched: bool = False  # a conditional create whose criteria found the resource: nothing to write

    @property
    def where(self) -> str:
        return f"Bundle.entry[{self.index}] ({self.method} {self.resource_type})"


def parse_entries(bundle: dict[str, Any], indexes: Sequence[int] | None = None) -> list[Entry]:
    """The entries; `indexes` are their positions in the client's Bundle when this one is a piece
    of it (errors name the entries the client sent)."""
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise InvalidRequest("Bundle.entry must be an array")
    if len(entries) > MAX_ENTRIES:
        raise PayloadTooLarge(f"A Bundle may carry at most {MAX_ENTRIES} entries, not {len(entries)}")
    if indexes is not None and len(indexes) != len(entries):
        raise InvalidRequest("The piece names an index for each of its entries")
    positions = indexes if indexes is not None else range(len(entries))
    return [_entry(index, raw) for index, raw in zip(positions, entries)]


def _entry(index: int, raw: Any) -> Entry:
    where = f"Bundle.entry[{index}]"
    if not isinstance(raw, dict) or not isinstance(raw.get("request"), dict):
        raise InvalidRequest(f"{where} has no request", expression=[f"{where}.request"])
    request = raw["request"]
    method = str(request.get("method", "")).upper()
    if method not in METHOD_ORDER:
        raise InvalidRequest(f"{where}.request.method '{method[:10]}' is not supported", expression=[f"{where}.request.method"])
    url = request.get("url")
    if not isinstance(url, str) or not url:
        raise InvalidRequest(f"{where}.request.url is missing", expression=[f"{where}.request.url"])
    parts = urlsplit(url)
    segments = [s for s in parts.path.split("/") if s]
    if not segments or not resources.is_resource_type(segments[0]) or (len(segments) > 2 and segments[2] != "_history"):
        raise InvalidRequest(f"{where}.request.url '{url[:80]}' is not Type, Type/id or Type?query", expression=[f"{where}.request.url"])
    return Entry(
        index=index,
        method=method,
        resource_type=segments[0],
        resource_id=segments[1] if len(segments) > 1 else None,
        query=parts.query,
        full_url=raw.get("fullUrl") if isinstance(raw.get("fullUrl"), str) else None,
        resource=raw.get("resource"),
        if_match=interactions.parse_if_match(request.get("ifMatch")),
        if_none_exist=request.get("ifNoneExist"),
    )


class BundleProcessor:
    """Runs the entries of one Bundle against one repository (one database transaction)."""

    def __init__(
        self,
        repo: Repository,
        options: RequestOptions,
        savepoint: Callable[[], Any],
    ) -> None:
        self.repo = repo
        self.options = options
        self.savepoint = savepoint

    async def transaction(
        self, bundle: dict[str, Any], *, indexes: Sequence[int] | None = None,
        assigned_ids: Mapping[int, str] | None = None,
    ) -> bytes:
        """`indexes`: the entries' positions in the client's Bundle; `assigned_ids`: ids chosen
        beforehand (by the gateway, for a transaction spanning services) for creates, by index."""
        entries = parse_entries(bundle, indexes)
        self.repo.in_transaction = True
        aliases = await self._assign_ids(entries, assigned_ids or {})
        for entry in entries:
            if entry.resource is not None:
                entry.resource = _rewrite(entry.resource, aliases)
                _refuse_local_urls(entry)
        await self._resolve_conditional_references(entries)
        self.repo.defer_reference_checks()
        results: dict[int, Result] = {}
        written: list[tuple[Entry, list[dict[str, Any]]]] = []  # what each entry (and its hooks) wrote
        for run in _runs(sorted(entries, key=lambda e: METHOD_ORDER[e.method]), self._joins_run):
            before = len(self.repo.deferred_references or [])
            if len(run) == 1:
                with located(run[0].where):
                    results[run[0].index] = await self._execute(run[0])
            else:
                outcomes = await self.repo.create_together(
                    [entry.resource for entry in run], [entry.resource_id or "" for entry in run],
                    [entry.where for entry in run])
                for entry, outcome in zip(run, outcomes):
                    results[entry.index] = interactions.write_result(outcome, self.options, created_status=201)
            # One body per entry of the run, in order; what hooks wrote besides goes with the last.
            bodies = (self.repo.deferred_references or [])[before:]
            for position, entry in enumerate(run):
                last = position == len(run) - 1
                written.append((entry, bodies[position:] if last else bodies[position:position + 1]))
        self.repo.deferred_references = None
        # Every entry is written: now each reference must point at something that exists.
        targets = iter(await self.repo.prefetch_references([body for _, bodies in written for body in bodies]))
        for entry, bodies in written:
            for body in bodies:
                with located(entry.where):
                    await self.repo.check_references(body, next(targets))
        ordered = [self._response_entry(results[e.index], e) for e in entries]
        return responses.bundle_bytes("transaction-response", ordered, timestamp=self._now())

    async def dry_run(
        self, bundle: dict[str, Any], *, indexes: Sequence[int] | None = None,
        assigned_ids: Mapping[int, str] | None = None,
    ) -> bytes:
        """The transaction's answer with nothing kept: everything it wrote (outbox rows and
        grants included) is rolled back, so that a transaction spanning services can check
        every piece before committing any."""
        savepoint = await self.repo.conn.begin_nested()
        try:
            return await self.transaction(bundle, indexes=indexes, assigned_ids=assigned_ids)
        finally:
            await savepoint.rollback()

    def _joins_run(self, entry: Entry) -> bool:
        """A create that may be written with its neighbours of the same type (`create_together`)."""
        return (entry.method == "POST" and not entry.matched and entry.resource_id is not None
                and entry.resource_type in self.repo.config.resource_types
                and isinstance(entry.resource, dict) and entry.resource.get("resourceType") == entry.resource_type
                and creates_together(self.repo.config.hooks_for(entry.resource_type), entry.resource))

    async def batch(self, bundle: dict[str, Any]) -> bytes:
        entries = parse_entries(bundle)
        out: list[bytes] = []
        for entry in entries:
            try:
                if entry.resource is not None:
                    _refuse_local_urls(entry, batch=True)
                async with self.savepoint():
                    result = await self._execute(entry)
                out.append(self._response_entry(result, entry))
            except FhirError as exc:
                out.append(_error_entry(exc))
        return responses.bundle_bytes("batch-response", out, timestamp=self._now())

    def _now(self) -> str:
        return format_instant(self.repo.config.clock())

    async def _assign_ids(self, entries: list[Entry], assigned_ids: Mapping[int, str]) -> dict[str, str]:
        aliases: dict[str, str] = {}
        for entry in entries:
            if entry.method == "POST":
                target_id = None
                if entry.if_none_exist:
                    matches = await self.repo.conditional_targets(entry.resource_type, entry.if_none_exist)
                    if len(matches) > 1:
                        raise MultipleMatches(f"Bundle.entry[{entry.index}] ifNoneExist matches several resources")
                    target_id = matches[0].resource_id if matches else None
                new_id = assigned_ids.get(entry.index) or self.repo.config.new_id(entry.resource_type)
                entry.resource_id = target_id or new_id
                entry.matched = target_id is not None
            elif entry.method == "PUT" and entry.resource_id is None and entry.query:
                matches = await self.repo.conditional_targets(entry.resource_type, entry.query)
                if len(matches) > 1:
                    raise MultipleMatches(f"Bundle.entry[{entry.index}] conditional update matches several resources")
                entry.resource_id = matches[0].resource_id if matches else self.repo.config.new_id(entry.resource_type)
                if isinstance(entry.resource, dict):
                    entry.resource = {**entry.resource, "id": entry.resource_id}
            if entry.full_url and entry.resource_id and entry.method != "DELETE":
                aliases[entry.full_url] = f"{entry.resource_type}/{entry.resource_id}"
        return aliases

    async def _resolve_conditional_references(self, entries: list[Entry]) -> None:
        cache: dict[str, str] = {}
        for entry in entries:
            if isinstance(entry.resource, dict):
                entry.resource = await self._resolve_in(entry.resource, cache, entry.index)

    async def _resolve_in(self, value: Any, cache: dict[str, str], index: int) -> Any:
        if isinstance(value, dict):
            out = {}
            for key, child in value.items():
                if key == "reference" and isinstance(child, str) and "?" in child and not child.startswith("http"):
                    out[key] = await self._conditional_reference(child, cache, index)
                else:
                    out[key] = await self._resolve_in(child, cache, index)
            return out
        if isinstance(value, list):
            return [await self._resolve_in(item, cache, index) for item in value]
        return value

    async def _conditional_reference(self, reference: str, cache: dict[str, str], index: int) -> str:
        if reference not in cache:
            resource_type, _, criteria = reference.partition("?")
            if resource_type not in self.repo.config.resource_types:
                raise UnprocessableEntity(
                    f"Bundle.entry[{index}]: conditional reference '{reference[:80]}' names a type kept by another service"
                )
            matches = await self.repo.conditional_targets(resource_type, criteria)
            if len(matches) != 1:
                raise UnprocessableEntity(
                    f"Bundle.entry[{index}]: conditional reference '{reference[:80]}' matches {len(matches)} resources, not 1"
                )
            cache[reference] = f"{resource_type}/{matches[0].resource_id}"
        return cache[reference]

    async def _execute(self, entry: Entry) -> Result:
        repo, options = self.repo, self.options
        if entry.matched:
            stored = await repo.read(entry.resource_type, entry.resource_id or "")
            return Result(200, stored.content, responses.resource_headers(stored, options.base, location=True), stored)
        if entry.method == "POST" and entry.resource_id is None:  # a batch entry: nothing pre-assigned
            return await interactions.create(
                repo, entry.resource_type, entry.resource, options, if_none_exist=entry.if_none_exist
            )
        if entry.method == "POST":
            resource = resources.require_resource(entry.resource, entry.resource_type)
            outcome = await repo.create({k: v for k, v in resource.items() if k != "id"}, resource_id=entry.resource_id)
            return interactions.write_result(outcome, options, created_status=201)
        if entry.method == "PUT" and entry.resource_id is None and entry.query:
            return await interactions.conditional_update(
                repo, entry.resource_type, entry.query, entry.resource, options, if_match=entry.if_match
            )
        if entry.method == "PUT":
            if entry.resource_id is None:
                raise InvalidRequest("PUT needs Type/id or Type?criteria in request.url")
            return await interactions.update(
                repo, entry.resource_type, entry.resource_id, entry.resource, options, if_match=entry.if_match
            )
        if entry.method == "PATCH":
            if entry.resource_id is None:
                raise InvalidRequest("PATCH needs Type/id in request.url")
            body, content_type = _patch_body(entry.resource)
            return await interactions.patch_instance(
                repo, entry.resource_type, entry.resource_id, body, content_type, options, if_match=entry.if_match
            )
        if entry.method == "DELETE":
            if entry.resource_id is None:
                return await interactions.conditional_delete(repo, entry.resource_type, entry.query, options)
            return await interactions.delete(repo, entry.resource_type, entry.resource_id, options, if_match=entry.if_match)
        if entry.resource_id is not None:
            return await interactions.read(repo, entry.resource_type, entry.resource_id, options)
        params = parse_qsl(entry.query, keep_blank_values=True)
        return await interactions.search_type(repo, entry.resource_type, params, options, self_path=entry.resource_type)

    def _response_entry(self, result: Result, entry: Entry) -> bytes:
        response: dict[str, Any] = {"status": _status_text(result.status)}
        if result.stored is not None:
            stored = result.stored
            response["location"] = f"{stored.resource_type}/{stored.resource_id}/_history/{stored.version_id}"
            response["etag"] = stored.etag
            response["lastModified"] = format_instant(stored.last_updated)
        parts = []
        if result.stored is not None:
            parts.append(b'"fullUrl":' + orjson.dumps(f"{self.options.base}/{result.stored.reference}"))
        if result.body is not None and self.options.prefer_return != "minimal":
            parts.append(b'"resource":' + result.body)
        if result.outcome is not None:
            response["outcome"] = orjson.loads(result.outcome)
        parts.append(b'"response":' + orjson.dumps(response))
        return b"{" + b",".join(parts) + b"}"


def _runs(entries: list[Entry], joins: Callable[[Entry], bool]) -> Iterator[list[Entry]]:
    """The entries in order, each alone but for consecutive creates of one type that `joins`."""
    run: list[Entry] = []
    for entry in entries:
        joined = joins(entry)
        if run and (not joined or entry.resource_type != run[0].resource_type):
            yield run
            run = []
        if joined:
            run.append(entry)
        else:
            yield [entry]
    if run:
        yield run


def _patch_body(resource: Any) -> tuple[Any, str]:
    # In a Bundle, a FHIRPath Patch is a Parameters resource; a JSON Patch travels as a Binary.
    if isinstance(resource, dict) and resource.get("resourceType") == "Binary":
        import base64

        try:
            data = orjson.loads(base64.b64decode(resource.get("data", "")))
        except (ValueError, orjson.JSONDecodeError):
            raise InvalidRequest("The Binary of a PATCH entry does not hold a JSON Patch") from None
        return data, resource.get("contentType", interactions.JSON_PATCH)
    return resource, "application/fhir+json"


def _refuse_local_urls(entry: Entry, *, batch: bool = False) -> None:
    """A `urn:uuid:`/`urn:oid:` reference names another entry of the Bundle; one left after the
    rewriting names none (or, in a batch, one the server may not link to)."""
    for path, reference in _references_in(entry.resource, entry.resource_type):
        if reference.startswith(("urn:uuid:", "urn:oid:")):
            raise UnprocessableEntity(
                f"{entry.where}: {path} refers to {reference[:80]}, which is not the fullUrl of an entry "
                f"this Bundle creates" + (" (batch entries cannot refer to each other)" if batch else ""),
                expression=[path],
            )


def _references_in(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        reference = value.get("reference")
        if isinstance(reference, str):
            yield f"{path}.reference", reference
        for key, child in value.items():
            if isinstance(child, dict | list):
                yield from _references_in(child, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _references_in(item, f"{path}[{index}]")


def _rewrite(value: Any, aliases: dict[str, str]) -> Any:
    if isinstance(value, str):
        return aliases.get(value, value)
    if isinstance(value, dict):
        return {k: _rewrite(v, aliases) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite(v, aliases) for v in value]
    return value


def _status_text(status: int) -> str:
    return {200: "200 OK", 201: "201 Created", 204: "204 No Content"}.get(status, str(status))


def _error_entry(exc: FhirError) -> bytes:
    response = {"status": str(exc.status_code), "outcome": exc.to_outcome()}
    return b'{"response":' + orjson.dumps(response) + b"}"


BundleRunner = Callable[[dict[str, Any]], Awaitable[bytes]]

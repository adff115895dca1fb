"""The FHIR RESTful interactions, named after the spec, independent of HTTP routing.

Each takes a repository and already-parsed request parts and returns a `Result`; the HTTP routes
and the batch/transaction processor both call them, so an entry in a transaction behaves exactly
like the same request on its own.
"""

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson

from fhirkit import jsonio, patch, resources
from fhirkit.api import responses
from fhirkit.errors import (
    FhirError,
    InvalidRequest,
    MultipleMatches,
    PreconditionFailed,
    ResourceNotFound,
    UnprocessableEntity,
    UnsupportedMediaType,
)
from fhirkit.search.request import SearchRequest, parse_count, parse_search
from fhirkit.search.values import date_range, format_instant, natural
from fhirkit.store.repository import Repository, StoredResource, WriteOutcome

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
FHIR_TYPES = ("application/fhir+json", "application/json", "application/json+fhir", "text/json", "")


@dataclass
class RequestOptions:
    base: str
    prefer_return: str = "representation"  # minimal | representation | OperationOutcome
    lenient: bool = False
    now: int | None = None


@dataclass
class Result:
    status: int
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    stored: StoredResource | None = None
    outcome: bytes | None = None


def parse_if_match(value: str | None) -> int | None:
    if value is None or value.strip() in ("", "*"):
        return None
    text = value.strip()
    text = text.removeprefix("W/")
    text = text.strip('"')
    version = natural(text)
    if version is None:
        raise InvalidRequest(f"If-Match '{value[:40]}' is not a version ETag such as W/\"3\"")
    return version


async def read(repo: Repository, resource_type: str, resource_id: str, options: RequestOptions) -> Result:
    stored = await repo.read(resource_type, resource_id)
    return Result(200, stored.content, responses.resource_headers(stored, options.base), stored)


async def vread(
    repo: Repository, resource_type: str, resource_id: str, version_id: str, options: RequestOptions
) -> Result:
    stored = await repo.vread(resource_type, resource_id, version_id)
    return Result(200, stored.content, responses.resource_headers(stored, options.base), stored)


async def create(
    repo: Repository, resource_type: str, body: Any, options: RequestOptions, *, if_none_exist: str | None = None
) -> Result:
    resource = resources.require_resource(body, resource_type)
    resource = {k: v for k, v in resource.items() if k != "id"}  # the server assigns the id
    outcome = await repo.create(resource, if_none_exist=if_none_exist)
    return write_result(outcome, options, created_status=201)


async def update(
    repo: Repository,
    resource_type: str,
    resource_id: str,
    body: Any,
    options: RequestOptions,
    *,
    if_match: int | None = None,
) -> Result:
    resource = resources.require_resource(body, resource_type)
    if "id" not in resource:
        raise InvalidRequest("An update must carry the resource's id in the body", expression=[f"{resource_type}.id"])
    outcome = await repo.update(resource_type, resource_id, resource, if_match=if_match)
    return write_result(outcome, options, created_status=201)


async def conditional_update(
    repo: Repository, resource_type: str, criteria: str, body: Any, options: RequestOptions, *, if_match: int | None
) -> Result:
    resource = resources.require_resource(body, resource_type)
    matches = await repo.conditional_targets(resource_type, criteria)
    if len(matches) > 1:
        raise MultipleMatches(f"Conditional update criteria '{criteria[:120]}' match several resources")
    if matches:
        target_id = matches[0].resource_id
        if "id" in resource and resource["id"] != target_id:
            raise InvalidRequest(f"The body's id does not match {resource_type}/{target_id} found by the criteria")
        outcome = await repo.update(resource_type, target_id, {**resource, "id": target_id}, if_match=if_match)
        return write_result(outcome, options, created_status=201)
    if "id" in resource:
        outcome = await repo.update(resource_type, resource["id"], resource, if_match=if_match)
    else:
        outcome = await repo.create(resource)
    return write_result(outcome, options, created_status=201)


async def patch_instance(
    repo: Repository,
    resource_type: str,
    resource_id: str,
    body: Any,
    content_type: str,
    options: RequestOptions,
    *,
    if_match: int | None = None,
) -> Result:
    apply = _patcher(body, content_type)
    outcome = await repo.patch(resource_type, resource_id, apply, if_match=if_match)
    return write_result(outcome, options, created_status=200)


def _patcher(body: Any, content_type: str) -> Any:
    kind = content_type.split(";")[0].strip().lower()

    def guarded(function: Any) -> Any:
        def run(resource: dict[str, Any]) -> dict[str, Any]:
            try:
                return function(resource, body)
            except patch.PatchError as exc:
                error = InvalidRequest if exc.status_code == 400 else UnprocessableEntity
                raise error(f"The patch cannot be applied: {exc}", expression=exc.expression) from None

        return run

    if kind == JSON_PATCH:
        if not isinstance(body, list):
            raise InvalidRequest("A JSON Patch body must be an array of operations")
        return guarded(patch.apply_json_patch)
    if kind == MERGE_PATCH or (kind in FHIR_TYPES and isinstance(body, dict) and body.get("resourceType") != "Parameters"):
        if not isinstance(body, dict):
            raise InvalidRequest("A merge patch body must be a JSON object")
        return guarded(patch.apply_merge_patch)
    if kind in FHIR_TYPES and isinstance(body, dict):
        return guarded(patch.apply_fhirpath_patch)
    raise UnsupportedMediaType(
        f"PATCH with Content-Type '{content_type[:60]}' is not supported; use {JSON_PATCH}, "
        f"application/fhir+json (FHIRPath Patch Parameters) or {MERGE_PATCH}"
    )


async def delete(
    repo: Repository, resource_type: str, resource_id: str, options: RequestOptions, *, if_match: int | None = None
) -> Result:
    stored = await repo.delete(resource_type, resource_id, if_match=if_match)
    message = f"Deleted {resource_type}/{resource_id}" if stored else f"{resource_type}/{resource_id} was not present"
    headers = {"ETag": stored.etag} if stored else {}
    return Result(200, responses.outcome_bytes("information", "informational", message), headers, stored)


async def conditional_delete(
    repo: Repository, resource_type: str, criteria: str, options: RequestOptions
) -> Result:
    matches = await repo.conditional_targets(resource_type, criteria)
    if len(matches) > 1:
        raise MultipleMatches(f"Conditional delete criteria '{criteria[:120]}' match several resources")
    if not matches:
        return Result(200, responses.outcome_bytes("information", "informational", "Nothing matched the criteria"))
    return await delete(repo, resource_type, matches[0].resource_id, options)


async def search_type(
    repo: Repository,
    resource_type: str,
    params: list[tuple[str, str]],
    options: RequestOptions,
    *,
    self_path: str,
) -> Result:
    request = parse_search(resource_type, params, lenient=options.lenient)
    page = await repo.search(request)
    entries = [_search_entry(m, options, request, "match") for m in page.matches]
    entries += [_search_entry(i, options, request, "include") for i in page.included]
    notes = list(page.warnings)
    if request.lenient_dropped:
        notes.append(f"Unknown search parameters ignored (Prefer: handling=lenient): {', '.join(request.lenient_dropped)}")
    entries += [responses.outcome_entry_bytes("warning", "informational", note) for note in notes]
    links = _links(options.base, self_path, params, page.next_cursor, page.previous_cursor)
    body = responses.bundle_bytes("searchset", entries, total=page.total, links=links)
    return Result(200, body)


def _search_entry(stored: StoredResource, options: RequestOptions, request: SearchRequest, mode: str) -> bytes:
    content = None
    if stored.content is not None and (request.elements or request.summary in ("true", "text", "data")):
        content = responses.subset(stored.content, request.elements, request.summary)
    return responses.entry_bytes(stored, options.base, mode=mode, content=content)


def _links(
    base: str,
    path: str,
    params: list[tuple[str, str]],
    next_cursor: str | None,
    previous_cursor: str | None,
) -> list[tuple[str, str]]:
    kept = [(k, v) for k, v in params if k != "_cursor"]

    def url(cursor: str | None) -> str:
        query = urlencode(kept + ([("_cursor", cursor)] if cursor else []))
        return f"{base}/{path}" + (f"?{query}" if query else "")

    links = [("self", url(None) if not any(k == "_cursor" for k, _ in params) else url(dict(params)["_cursor"]))]
    links.insert(1, ("first", url(None)))
    if next_cursor:
        links.append(("next", url(next_cursor)))
    if previous_cursor:
        links.append(("previous", url(previous_cursor)))
    return links


async def history(
    repo: Repository,
    resource_type: str | None,
    resource_id: str | None,
    params: list[tuple[str, str]],
    options: RequestOptions,
    *,
    self_path: str,
) -> Result:
    values = dict(params)
    unknown = set(values) - {"_count", "_since", "_at", "_cursor", "_format", "_pretty"}
    if unknown and not options.lenient:
        raise InvalidRequest(f"Unsupported history parameter(s): {', '.join(sorted(unknown))[:120]}")
    count = 50
    if "_count" in values:
        count = parse_count(values["_count"])
    since = None
    if "_since" in values:
        bounds = date_range(values["_since"])
        if bounds is None:
            raise InvalidRequest(f"_since '{values['_since'][:40]}' is not a valid instant")
        since = bounds[0]
    at = None
    if "_at" in values:
        at = date_range(values["_at"])
        if at is None:
            raise InvalidRequest(f"_at '{values['_at'][:40]}' is not a valid date, dateTime or instant")
    versions, next_cursor = await repo.history(
        resource_type, resource_id, count=count, since=since, at=at, cursor=values.get("_cursor")
    )
    entries = [_history_entry(v, options.base) for v in versions]
    links = _links(options.base, self_path, params, next_cursor, None)
    return Result(200, responses.bundle_bytes("history", entries, links=links))


def _history_entry(stored: StoredResource, base: str) -> bytes:
    url = f"{stored.resource_type}/{stored.resource_id}"
    method = {"POST": "POST", "PUT": "PUT", "PATCH": "PATCH", "DELETE": "DELETE"}.get(stored.method or "", "PUT")
    request = {"method": method, "url": url if method != "POST" else stored.resource_type}
    response = {
        "status": "410 Gone" if stored.deleted else ("201 Created" if stored.version_id == 1 else "200 OK"),
        "etag": stored.etag,
        "lastModified": format_instant(stored.last_updated),
    }
    return responses.entry_bytes(stored, base, request=request, response=response)


async def validate_resource(repo: Repository, resource_type: str, body: Any) -> Result:
    """`$validate`: 200 with an OperationOutcome saying what is wrong; nothing is stored."""
    if isinstance(body, dict) and body.get("resourceType") == "Parameters":
        body = next(
            (p.get("resource") for p in body.get("parameter", []) if p.get("name") == "resource"), None
        )
    try:
        resource = resources.require_resource(body, resource_type)
        resources.validate(resource)
        await repo.check_references(resource)
    except FhirError as exc:
        return Result(200, orjson.dumps(exc.to_outcome()))
    return Result(200, responses.outcome_bytes("information", "informational", f"{resource_type} is valid"))


def write_result(outcome: WriteOutcome, options: RequestOptions, *, created_status: int) -> Result:
    stored = outcome.stored
    status = created_status if outcome.created else 200
    headers = responses.resource_headers(stored, options.base, location=True)
    if options.prefer_return == "minimal":
        return Result(status, None, headers, stored)
    if options.prefer_return == "OperationOutcome":
        verb = "Created" if outcome.created else ("Updated" if outcome.changed else "Unchanged")
        message = f"{verb} {stored.resource_type}/{stored.resource_id} version {stored.version_id}"
        return Result(status, responses.outcome_bytes("information", "informational", message), headers, stored)
    return Result(status, stored.content, headers, stored)


def split_criteria(url_query: str) -> str:
    """Criteria for conditional interactions, normalised (blank values kept)."""
    return urlencode(parse_qsl(url_query, keep_blank_values=True))


# An ASGI scope extension: (the body's bytes, their parse) handed by a caller in the same
# process that parsed the body already (the gateway, which reads a Bundle to route it). A large
# transaction's parse costs as much as validating a tenth of its entries.
PARSED_BODY = "alliance.parsed_body"


def load_body(raw: bytes, handed: tuple[bytes, Any] | None = None) -> Any:
    """The request body's JSON (`handed`: the caller's own parse of these bytes, if any)."""
    if not raw.strip():
        raise InvalidRequest("The request has no body")
    value = handed[1] if handed is not None and handed[0] == raw else jsonio.loads(raw)
    jsonio.refuse_nul(raw, value)
    return value


__all__ = [
    "PreconditionFailed",
    "RequestOptions",
    "ResourceNotFound",
    "Result",
]

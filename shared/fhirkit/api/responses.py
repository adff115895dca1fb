"""Responses built from stored bytes: single resources as stored, Bundles by splicing.

No model is built and no stored resource is re-serialised here unless the client asked for a
subset (`_elements`, `_summary`), which needs the resource's structure (read from the R4B
models' field declarations, once per element).
"""

import functools
import typing
from collections.abc import Iterable, Mapping, Sequence
from email.utils import formatdate
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from fhirkit import jsonio, resources
from fhirkit.errors import NotAcceptable
from fhirkit.store.repository import StoredResource

FHIR_JSON = "application/fhir+json; charset=utf-8"
JSON_FORMATS = {"json", "application/json", "application/fhir+json", "application/json+fhir", "text/json"}
SUMMARY_ALWAYS = {"resourceType", "id", "meta"}
SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}


def http_date(micros: int) -> str:
    return formatdate(micros / 1_000_000, usegmt=True)


def check_request_format(request: Request) -> None:
    """`check_format` of a request's `_format` and Accept. The query string is parsed only when it
    may name `_format` (also as `%5Fformat`): parsing it on every request cost a read by id about
    1 % of its CPU, twice in the embedded mode (the gateway, then the service)."""
    asked = request.query_params.get("_format") if b"format" in request.scope["query_string"] else None
    check_format(asked, request.headers.get("accept"))


def query_string(request: Request) -> str:
    """The request's query string as sent (what `request.url.query` is, without building a URL)."""
    return request.scope["query_string"].decode("latin-1")


def check_format(format_param: str | None, accept: str | None) -> None:
    """JSON is the only format served; ask for XML and get a 406 rather than JSON silently."""
    if format_param is not None:
        # An unencoded `+` in a query string reads as a space: `application/fhir json`.
        if format_param.split(";")[0].strip().replace(" ", "+") not in JSON_FORMATS:
            raise NotAcceptable(f"_format '{format_param[:60]}' is not supported; this server speaks FHIR JSON")
        return
    if not accept:
        return
    wanted = [part.split(";")[0].strip() for part in accept.split(",")]
    if any(w in JSON_FORMATS or w in ("*/*", "application/*", "") for w in wanted):
        return
    raise NotAcceptable(f"Accept '{accept[:80]}' cannot be served; this server speaks application/fhir+json")


def fhir_response(
    content: bytes | None, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(content=content or b"", status_code=status, headers=dict(headers or {}), media_type=FHIR_JSON)


def resource_headers(stored: StoredResource, base: str, *, location: bool = False) -> dict[str, str]:
    headers = {"ETag": stored.etag, "Last-Modified": http_date(stored.last_updated)}
    if location:
        headers["Location"] = f"{base}/{stored.resource_type}/{stored.resource_id}/_history/{stored.version_id}"
    return headers


def outcome_bytes(severity: str, code: str, diagnostics: str) -> bytes:
    return orjson.dumps(
        {"resourceType": "OperationOutcome", "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}]}
    )


def subset(content: bytes, elements: Sequence[str], summary: str | None) -> bytes:
    """Apply `_elements` or `_summary=true|text|data` and mark the resource SUBSETTED.

    Mandatory elements are always kept, as the spec asks, so a subset is still a valid resource.
    `_elements` takes element names (R4) and also paths into them (R5: `code.coding`,
    `identifier.value`, `Observation.status`): a path keeps only the named sub-elements, with the
    sub-elements mandatory where they stand.
    """
    resource = jsonio.loads(content)
    resource_type = resource.get("resourceType", "")
    if elements:
        kept = _picked(resource, resource_type, element_tree(resource_type, elements))
    else:
        kept = _summarized(resource, resource_type, summary)
    for key in SUMMARY_ALWAYS:
        if key in resource:
            kept[key] = resource[key]
    kept = {key: kept[key] for key in resource if key in kept}  # the stored order
    meta = dict(kept.get("meta") or {})
    meta["tag"] = [*meta.get("tag", []), SUBSETTED]
    kept["meta"] = meta
    return jsonio.dumps(kept)


def _summarized(resource: dict[str, Any], resource_type: str, summary: str | None) -> dict[str, Any]:
    info = resources.top_level_elements(resource_type)

    def keep(key: str) -> bool:
        element = info.get(key)
        if summary == "text":
            return key == "text" or (element is not None and element.required)
        if summary == "data":
            return key != "text"
        return element is not None and (element.summary or element.required)  # _summary=true

    return {key: value for key, value in resource.items() if keep(key.removeprefix("_"))}  # `_key`: key's extensions


WHOLE = None  # an element tree's leaf: keep the element with everything in it
ElementTree = dict[str, Any]  # element name → WHOLE or the tree of its sub-elements to keep


def element_tree(resource_type: str, elements: Sequence[str]) -> ElementTree:
    """`_elements=code.coding,subject,Patient.name` → {"code": {"coding": WHOLE}, "subject": WHOLE}
    for an Observation. A path may start with the resource type; one starting with another type
    (element names start in lower case) is for resources of that type, as R5 reads it."""
    tree: ElementTree = {}
    for path in elements:
        parts = path.split(".")
        if parts[0][:1].isupper():
            if parts[0] != resource_type:
                continue
            parts = parts[1:]
        if not parts or not all(parts):
            continue
        node = tree
        for depth, part in enumerate(parts):
            if part in node and node[part] is WHOLE:
                break  # already kept whole
            if depth == len(parts) - 1:
                node[part] = WHOLE
            else:
                node = node.setdefault(part, {})
    return tree


_ABSENT = object()


def _picked(item: dict[str, Any], type_name: str, tree: ElementTree) -> dict[str, Any]:
    """The elements of `item` (a resource or a complex element of FHIR type `type_name`) that
    `tree` names, plus the mandatory ones."""
    info = resources.top_level_elements(type_name) if type_name else {}
    kept: dict[str, Any] = {}
    for key, value in item.items():
        base = key.removeprefix("_")  # `_key` carries key's extensions
        element = info.get(base)
        wanted = tree.get(base, tree.get(element.name, _ABSENT) if element else _ABSENT)
        if wanted is WHOLE or (element is not None and element.required):
            kept[key] = value
        elif isinstance(wanted, dict):
            narrowed = _narrowed(value, _element_type(type_name, base), wanted)
            if narrowed is not None:
                kept[key] = narrowed
    return kept


def _narrowed(value: Any, type_name: str, tree: ElementTree) -> Any:
    """`value` with only the sub-elements `tree` names (None when nothing is left)."""
    if isinstance(value, list):
        items = [_narrowed(item, type_name, tree) for item in value]
        kept = [item for item in items if item is not None]
        return kept or None
    if isinstance(value, dict):
        return _picked(value, type_name, tree) or None
    return None  # a primitive has no sub-elements to name


@functools.cache
def _element_type(owner_type: str, key: str) -> str:
    """The FHIR type (complex type or backbone element, as the R4B models name it) of the element
    `key` of `owner_type`; "" when it is a primitive or unknown."""
    model = resources.model_class(owner_type) if owner_type else None
    fields = getattr(model, "model_fields", None) or {}
    field = next((f for name, f in fields.items() if (f.alias or name) == key), None)
    if field is None:
        return ""
    for candidate in _annotation_types(field.annotation):
        name = getattr(candidate, "__name__", "")  # the models annotate `CodeableConceptType`
        if name.endswith("Type") and hasattr(resources.model_class(name[:-4]), "model_fields"):
            return name[:-4]
    return ""


def _annotation_types(annotation: Any) -> list[Any]:
    found = [annotation]
    for argument in typing.get_args(annotation):
        found += _annotation_types(argument)
    return found


def bundle_bytes(
    bundle_type: str,
    entries: Iterable[bytes],
    *,
    total: int | None = None,
    links: Sequence[tuple[str, str]] = (),
    bundle_id: str | None = None,
    timestamp: str | None = None,
) -> bytes:
    head: dict[str, Any] = {"resourceType": "Bundle"}
    if bundle_id:
        head["id"] = bundle_id
    head["meta"] = {"lastUpdated": timestamp} if timestamp else None
    if head["meta"] is None:
        del head["meta"]
    head["type"] = bundle_type
    if timestamp:
        head["timestamp"] = timestamp
    if total is not None:
        head["total"] = total
    if links:
        head["link"] = [{"relation": relation, "url": url} for relation, url in links]
    prefix = orjson.dumps(head)[:-1]
    body = b",".join(entries)
    return prefix + b',"entry":[' + body + b"]}" if body else prefix + b"}"


def outcome_entry_bytes(severity: str, code: str, diagnostics: str) -> bytes:
    """A searchset entry telling the client something about the search (search.mode outcome)."""
    return b'{"resource":' + outcome_bytes(severity, code, diagnostics) + b',"search":{"mode":"outcome"}}'


def entry_bytes(
    stored: StoredResource,
    base: str,
    *,
    mode: str | None = None,
    content: bytes | None = None,
    request: Mapping[str, str] | None = None,
    response: Mapping[str, Any] | None = None,
) -> bytes:
    parts = [b'{"fullUrl":' + orjson.dumps(f"{base}/{stored.resource_type}/{stored.resource_id}")]
    body = content if content is not None else stored.content
    if body is not None:
        parts.append(b'"resource":' + body)
    if mode is not None:
        parts.append(b'"search":{"mode":"' + mode.encode() + b'"}')
    if request is not None:
        parts.append(b'"request":' + orjson.dumps(dict(request)))
    if response is not None:
        parts.append(b'"response":' + orjson.dumps(dict(response)))
    return b",".join(parts) + b"}"

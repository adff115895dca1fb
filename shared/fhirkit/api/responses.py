"""Responses built from stored bytes: single resources as stored, Bundles by splicing.

No model is built and no stored resource is re-serialised here unless the client asked for a
subset (`_elements`, `_summary`), which needs the resource's structure.
"""

from collections.abc import Iterable, Mapping, Sequence
from email.utils import formatdate
from typing import Any

import orjson
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
    """Apply `_elements` or `_summary=true|text|data` (top-level elements) and mark it SUBSETTED.

    Mandatory elements are always kept, as the spec asks, so a subset is still a valid resource.
    """
    resource = jsonio.loads(content)
    info = resources.top_level_elements(resource.get("resourceType", ""))
    if elements:
        wanted = {name.rsplit(".", 1)[-1] for name in elements}

        def keep(key: str) -> bool:
            element = info.get(key)
            return element is not None and (element.required or key in wanted or element.name in wanted)
    elif summary == "text":

        def keep(key: str) -> bool:
            element = info.get(key)
            return key == "text" or (element is not None and element.required)
    elif summary == "data":

        def keep(key: str) -> bool:
            return key != "text"
    else:  # _summary=true

        def keep(key: str) -> bool:
            element = info.get(key)
            return element is not None and (element.summary or element.required)

    kept = {
        key: value
        for key, value in resource.items()
        if key in SUMMARY_ALWAYS or keep(key.removeprefix("_"))  # `_key` carries key's extensions
    }
    meta = dict(kept.get("meta") or {})
    meta["tag"] = [*meta.get("tag", []), SUBSETTED]
    kept["meta"] = meta
    return jsonio.dumps(kept)


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

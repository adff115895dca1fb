"""Hostile input (issue 9, item 7): limits answered with a 4xx OperationOutcome, odd and malicious
values refused or handled cleanly, and a property-based fuzz of the FHIR endpoints that finds no
5xx. The cases already in test_fhir_errors.py (16 MiB body, nesting, invalid UTF-8 and lone
surrogates in bodies, invalid ids, odd queries, bodies, patches and bundles) are not repeated.

The fuzz uses hypothesis with `derandomize=True` and no example database, so every run (and CI)
sends the same requests; its data belongs to its own organization. The spec-driven fuzz
(schemathesis over docs/openapi.yaml) is tests/test_openapi_fuzz.py; this one generates FHIR
requests directly, with FHIR-shaped bodies and parameters the description cannot express.
"""

import asyncio
import json
import string
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhirkit.api import bundles
from fhirkit.search import definitions
from fhirkit.search import request as search_request
from fhirkit.store import repository
from tests.support import outcome_code

FUZZ_ORG = "Organization/hostile-input-fuzz"


def new_system() -> str:
    return f"urn:test:{uuid.uuid4().hex}"


def patient(system: str, value: str = "1", **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": system, "value": value}], **extra}


def observation(system: str, value: str = "1", **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "identifier": [{"system": system, "value": value}], "status": "final",
            "code": {"text": "x"}, **extra}


async def count(api: Any, query: str, **kwargs: Any) -> int:
    response = await api.get(f"{query}&_summary=count", **kwargs)
    assert response.status_code == 200, response.text
    return response.json()["total"]


def assert_clean_refusal(response: httpx.Response, *statuses: int) -> None:
    assert 400 <= response.status_code < 500, (response.request.url, response.status_code, response.text[:300])
    if statuses:
        assert response.status_code in statuses, (response.request.url, response.status_code, response.text[:300])
    assert response.json()["resourceType"] == "OperationOutcome", response.text[:300]


def assert_no_5xx(response: httpx.Response) -> None:
    assert response.status_code < 500, (response.request.method, response.request.url, response.text[:300])
    if response.status_code >= 400:
        assert response.json()["resourceType"] == "OperationOutcome", response.text[:300]


def location_id(response: httpx.Response) -> str:
    return response.headers["location"].split("/")[-3]


# --- limits -------------------------------------------------------------------------------------


async def test_bundle_over_the_entry_limit_is_413_and_writes_nothing(api):
    assert bundles.MAX_ENTRIES == 1000  # docs/api.md, "Limits"
    system = new_system()
    entries = [{"request": {"method": "POST", "url": "Patient"}, "resource": patient(system, str(i))}
               for i in range(bundles.MAX_ENTRIES + 1)]
    for kind in ("transaction", "batch"):
        response = await api.post("", {"resourceType": "Bundle", "type": kind, "entry": entries})
        assert_clean_refusal(response, 413)
        assert outcome_code(response) == "too-costly"
        assert str(bundles.MAX_ENTRIES) in response.json()["issue"][0]["diagnostics"]
    assert await count(api, f"Patient?identifier={system}|") == 0


async def test_batch_spanning_services_cannot_bypass_the_entry_limit(api):
    # The gateway splits such a batch into one-entry batches; each would pass the service's check.
    system = new_system()
    entries = [
        {"request": {"method": "POST", "url": kind}, "resource": make(system, str(i))}
        for i in range(bundles.MAX_ENTRIES // 2 + 1)
        for kind, make in (("Patient", patient), ("Observation", observation))
    ]
    assert len(entries) > bundles.MAX_ENTRIES
    response = await api.post("", {"resourceType": "Bundle", "type": "batch", "entry": entries})
    assert_clean_refusal(response, 413)
    assert outcome_code(response) == "too-costly"
    assert await count(api, f"Patient?identifier={system}|") == 0
    assert await count(api, f"Observation?identifier={system}|") == 0


async def test_bundle_at_the_entry_limit_is_accepted(api):
    system = new_system()
    entries = [{"request": {"method": "GET", "url": f"Patient?identifier={system}|&_count=0"}}] * bundles.MAX_ENTRIES
    response = await api.post("", {"resourceType": "Bundle", "type": "batch", "entry": entries})
    assert response.status_code == 200, response.text[:300]
    answered = response.json()["entry"]
    assert len(answered) == bundles.MAX_ENTRIES
    assert {e["response"]["status"][:3] for e in answered} == {"200"}


async def test_count_above_the_maximum_is_clamped(api, monkeypatch):
    assert search_request.MAX_COUNT == 1000  # docs/api.md, "Limits"
    monkeypatch.setattr(search_request, "MAX_COUNT", 3)
    system = new_system()
    for i in range(5):
        assert (await api.post("Patient", patient(system, str(i)))).status_code == 201
    for asked in ("4", "1000", "99999999999999999999", "9" * 5000, "0004"):
        response = await api.get(f"Patient?identifier={system}|&_count={asked}")
        assert response.status_code == 200, (asked[:20], response.text[:300])
        bundle = response.json()
        assert len(bundle["entry"]) == 3 and bundle["total"] == 5, asked[:20]
        assert any(link["relation"] == "next" for link in bundle["link"])
    small = (await api.get(f"Patient?identifier={system}|&_count=2")).json()
    assert len(small["entry"]) == 2


async def test_history_count_is_clamped_and_cursor_bounded(api, monkeypatch):
    monkeypatch.setattr(search_request, "MAX_COUNT", 3)
    created = await api.post("Patient", patient(new_system()))
    pid = location_id(created)
    for active in (True, False, True, False):
        assert (await api.put(f"Patient/{pid}", {**created.json(), "active": active})).status_code == 200
    history = await api.get(f"Patient/{pid}/_history?_count={'9' * 5000}")
    assert history.status_code == 200, history.text[:300]
    assert [e["resource"]["meta"]["versionId"] for e in history.json()["entry"]] == ["5", "4", "3"]
    # A cursor that is not a plain small number is no cursor: the first page again, not a 500.
    for cursor in ("9" * 30, "\u00b2", "-1"):
        page = await api.get(f"Patient/{pid}/_history?_count=3&_cursor={quote(cursor)}")
        assert page.status_code == 200, (cursor, page.text[:300])
        assert page.json()["entry"][0]["resource"]["meta"]["versionId"] == "5"


@pytest.mark.parametrize("value", ["\u00b2", "\u0661", "1.5", "1e3", "+5", " 5", "0x10", "-0"])
async def test_count_that_is_not_ascii_digits_is_400(api, value):
    for path in ("Patient?_count=", "Patient/_history?_count="):
        response = await api.get(path + quote(value))
        assert_clean_refusal(response, 400)
        assert "_count" in response.json()["issue"][0]["diagnostics"]


async def test_include_fan_out_is_bounded(api, monkeypatch):
    assert repository.MAX_INCLUDED == 1000  # docs/api.md, "Limits"
    org = await api.post("Organization", {"resourceType": "Organization", "name": f"fan-out {uuid.uuid4().hex}"})
    org_id = location_id(org)
    system = new_system()
    for i in range(8):
        body = patient(system, str(i), managingOrganization={"reference": f"Organization/{org_id}"})
        assert (await api.post("Patient", body)).status_code == 201

    async def included(query: str) -> list[dict[str, Any]]:
        response = await api.get(query)
        assert response.status_code == 200, response.text[:300]
        return [e for e in response.json().get("entry", []) if e["search"]["mode"] == "include"]

    reverse = f"Organization?_id={org_id}&_revinclude=Patient:organization"
    iterate = f"Organization?_id={org_id}&_revinclude=Patient:organization&_include:iterate=Patient:organization"
    assert len(await included(reverse)) == 8
    monkeypatch.setattr(repository, "MAX_INCLUDED", 5)
    assert len(await included(reverse)) == 5
    assert len(await included(iterate)) == 5
    forward = await included(f"Patient?identifier={system}|&_include=Patient:organization&_count=8")
    assert len(forward) == 1  # the same target is included once, not once per match


# --- bodies -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "content_type"),
    [("", "application/fhir+json"), ("Patient/nested-patch", "application/json-patch+json"),
     ("Patient/$validate", "application/fhir+json"), ("Patient/_search", "application/fhir+json")],
)
async def test_deep_nesting_is_refused_on_every_body_path(api, path, content_type):
    deep = "[" * 200 + "]" * 200
    body = ('{"resourceType":"Bundle","type":"transaction","entry":' + deep + "}").encode()
    method = "PATCH" if "patch" in content_type else "POST"
    response = await api.request(method, path, body, headers={"Content-Type": content_type})
    assert_clean_refusal(response)


async def test_nesting_at_the_limit_is_accepted_and_one_more_refused(api):
    from fhirkit.jsonio import MAX_NESTING

    def nested(levels: int) -> bytes:
        # The resource object is level 1, `extension` 2, each extension object and its array +2.
        inner = levels - 2
        pairs = (inner - 1) // 2
        text = '{"url":"urn:x","valueString":"v"}'
        for _ in range(pairs):
            text = '{"url":"urn:x","extension":[' + text + "]}"
        return ('{"resourceType":"Patient","extension":[' + text + "]}").encode()

    from fhirkit import jsonio

    jsonio.loads(nested(MAX_NESTING - 1))
    with pytest.raises(Exception, match="nests deeper"):
        jsonio.loads(nested(MAX_NESTING + 1))
    assert (await api.post("Patient", nested(MAX_NESTING - 1))).status_code == 201
    assert_clean_refusal(await api.post("Patient", nested(MAX_NESTING + 1)), 400)


@pytest.mark.parametrize(
    "literal",
    ["9" * 5000, "1e999999", "-1e999999", "1e-999999", "1" + "0" * 400, "0." + "0" * 400 + "1", "NaN", "Infinity"],
)
async def test_enormous_numbers_in_bodies_never_500(api, literal):
    system = new_system()
    raw = json.dumps(observation(system)).encode()[:-1] + b',"valueQuantity":{"value":' + literal.encode() + b"}}"
    response = await api.post("Observation", raw)
    assert_no_5xx(response)
    if response.status_code == 201:
        # Kept exactly as written (FHIR decimals are arbitrary precision), and searchable.
        stored = await api.get(f"Observation/{location_id(response)}")
        assert f'"value":{literal}'.encode() in stored.content
        found = await api.get(f"Observation?identifier={system}|&value-quantity=gt0")
        assert found.status_code == 200
    else:
        assert await count(api, f"Observation?identifier={system}|") == 0
    integer = await api.post("Patient", json.dumps(patient(system)).encode()[:-1]
                             + b',"multipleBirthInteger":' + literal.encode() + b"}")
    assert_clean_refusal(integer, 400)


@pytest.mark.parametrize(
    "body",
    [
        b'{"resourceType":"Patient","name":[{"family":"a\\u0000b"}]}',
        b'{"resourceType":"Patient","name":[{"family":"\\u0000"}]}',
        b'{"resourceType":"Patient","identifier":[{"system":"urn:x","value":"\\u0000"}]}',
        b'{"resourceType":"Patient","name":[{"\\u0000family":"x"}]}',
    ],
)
async def test_nul_in_bodies_is_400(api, body):
    # FHIR strings may not hold U+0000 and PostgreSQL text cannot: refused, not a database error.
    for method, path in (("POST", "Patient"), ("PUT", "Patient/nul-test")):
        sent = body if method == "POST" else body[:-1] + b',"id":"nul-test"}'
        response = await api.request(method, path, sent)
        assert_clean_refusal(response, 400)
    bundle = b'{"resourceType":"Bundle","type":"transaction","entry":[{"request":{"method":"POST","url":"Patient"},' \
             b'"resource":' + body + b"}]}"
    assert_clean_refusal(await api.post("", bundle), 400)
    assert (await api.get("Patient/nul-test")).status_code == 404


async def test_escaped_backslash_u0000_is_just_text(api):
    # `\\u0000` in JSON is a backslash followed by "u0000", not NUL.
    response = await api.post("Patient", b'{"resourceType":"Patient","name":[{"family":"a\\\\u0000b"}]}')
    assert response.status_code == 201, response.text
    assert response.json()["name"][0]["family"] == "a\\u0000b"


@pytest.mark.parametrize(
    "text",
    ["\u202e\u738b\u200f", "\u200b\u200d\ufeff", "\u5f20\u0301\u0308", "\U0001f600\U0001f9d1\u200d\u2695", "\u00a0 ",
     "\ufffd\uffff", "\u0645\u062d\u0645\u062f\u200e", "\u1100\u1161"],
)
async def test_odd_unicode_is_kept_exactly_and_searchable(api, text):
    system = new_system()
    created = await api.post("Patient", patient(system, name=[{"family": text}]))
    assert created.status_code == 201, created.text
    read = await api.get(f"Patient/{location_id(created)}")
    assert read.json()["name"][0]["family"] == text
    exact = await api.get(f"Patient?identifier={system}|&family:exact={quote(text)}")
    assert exact.status_code == 200 and exact.json()["total"] == 1
    by_identifier = await api.get(f"Patient?identifier={quote(system + '|' + text)}")
    assert by_identifier.status_code == 200 and by_identifier.json()["total"] == 0


# --- parameters ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    ["name=%00", "name=a%00b", "identifier=%00%7C%00", "organization=Organization/%00", "birthdate=2020%00",
     "_id=%00", "family:exact=%00", "_has:Observation:patient:code=%00", "general-practitioner.name=%00",
     "_sort=%00", "_include=Patient:organization%00"],
)
async def test_nul_in_search_parameters_is_400(api, query):
    response = await api.get(f"Patient?{query}")
    assert_clean_refusal(response, 400)
    posted = await api.post("Patient/_search", query.encode(),
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert_clean_refusal(posted, 400)
    in_batch = await api.post("", {"resourceType": "Bundle", "type": "batch",
                                   "entry": [{"request": {"method": "GET", "url": f"Patient?{query}"}}]})
    assert in_batch.status_code == 200
    assert in_batch.json()["entry"][0]["response"]["status"].startswith("400")
    conditional = await api.post("Patient", {"resourceType": "Patient"}, headers={"If-None-Exist": query})
    assert_clean_refusal(conditional, 400)


@pytest.mark.parametrize("raw", ["%FF", "%ED%A0%80", "%C0%AF", "%E2%80%AE%E7%8E%8B", "%F4%90%80%80"])
async def test_invalid_utf8_and_surrogates_in_parameters_never_500(api, raw):
    system = new_system()
    await api.post("Patient", patient(system, name=[{"family": "Zhou"}]))
    for query in (f"name={raw}", f"identifier={system}%7C{raw}", f"{raw}=1", f"_sort={raw}", f"birthdate={raw}"):
        response = await api.get(f"Patient?identifier={system}|&{query}")
        assert_no_5xx(response)
        if response.status_code == 200:
            assert response.json()["total"] == 0, query  # replaced characters match nothing
    form = await api.post("Patient/_search", f"name={raw}".encode().replace(b"%FF", b"\xff"),
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert_no_5xx(form)


SQL_PAYLOADS = [
    "' OR '1'='1", "\"; DROP TABLE fhir_resource; --", "1); DELETE FROM fhir_resource; --",
    "' UNION SELECT content FROM fhir_resource --", "%", "_", "\\", "\\%", "''", "`", "/*", "$1", ":param", "?",
]

# One parameter of every search-parameter type (and the result parameters) the server answers.
# No held type has a `number` parameter; the numeric comparisons are those of quantity and date.
SQL_TARGETS = [
    ("Patient", "identifier", "token"), ("Patient", "gender", "token"), ("Patient", "_id", "token"),
    ("Patient", "name", "string"), ("Patient", "family:contains", "string"), ("Patient", "family:exact", "string"),
    ("Patient", "organization", "reference"), ("Patient", "general-practitioner:Practitioner", "reference"),
    ("Patient", "birthdate", "date"), ("Patient", "_lastUpdated", "date"),
    ("Observation", "value-quantity", "quantity"), ("ValueSet", "url", "uri"), ("ValueSet", "url:below", "uri"),
    ("Patient", "general-practitioner.name", "chain"), ("Patient", "_has:Observation:patient:code", "has"),
    ("Patient", "_sort", "sort"), ("Patient", "_include", "include"), ("Patient", "_revinclude", "include"),
    ("Patient", "_elements", "elements"), ("Patient", "_summary", "summary"), ("Patient", "_total", "total"),
    ("Patient", "_cursor", "cursor"),
]


@pytest.mark.parametrize(("resource_type", "name", "kind"), SQL_TARGETS, ids=[f"{t[1]}" for t in SQL_TARGETS])
async def test_sql_metacharacters_in_every_parameter_kind_match_nothing(api, resource_type, name, kind):
    system = new_system()
    marker = (await api.post("Patient", patient(system, name=[{"family": "Marker"}]))).status_code
    assert marker == 201
    for payload in SQL_PAYLOADS:
        for value in (payload, f"Marker{payload}" if kind != "token" else f"{system}|{payload}"):
            response = await api.get(f"{resource_type}?identifier={quote(system + '|')}&{quote(name, safe=':')}="
                                     f"{quote(value, safe='')}")
            assert_no_5xx(response)
            if response.status_code == 200 and kind in ("token", "string", "reference", "date", "quantity",
                                                         "uri", "chain", "has"):
                # LIKE wildcards and quotes are literal: `name=%` does not match "Marker".
                assert response.json()["total"] == 0, (name, value, response.text[:300])
    # The table is still there and still answers.
    assert await count(api, f"Patient?identifier={system}|") == 1


async def test_like_wildcards_are_literal_in_string_search(api):
    system = new_system()
    for family in ("100%", "a_b", "back\\slash"):
        assert (await api.post("Patient", patient(system, family, name=[{"family": family}]))).status_code == 201

    async def families(query: str) -> set[str]:
        response = await api.get(f"Patient?identifier={quote(system + '|')}&{query}")
        assert response.status_code == 200, response.text[:300]
        return {e["resource"]["name"][0]["family"] for e in response.json().get("entry", [])}

    assert await families("name=%25") == set()
    assert await families("name=100%25") == {"100%"}
    assert await families("name:contains=_") == {"a_b"}
    assert await families("name=a_") == {"a_b"}
    assert await families("name=a%25") == set()
    assert await families("name:contains=%5C") == {"back\\slash"}


@pytest.mark.parametrize(
    ("method", "header", "value"),
    [("PUT", "If-Match", 'W/"\u00b2"'), ("PUT", "If-Match", 'W/"' + "9" * 30 + '"'), ("DELETE", "If-Match", 'W/"' + "9" * 5000 + '"')],
)
async def test_odd_version_numbers_in_if_match_are_400(api, method, header, value):
    created = await api.post("Patient", patient(new_system()))
    pid = location_id(created)
    body = {**created.json(), "active": True} if method == "PUT" else None
    response = await api.request(method, f"Patient/{pid}", body, headers={header: value.encode("utf-8")})
    assert_clean_refusal(response, 400)
    assert (await api.get(f"Patient/{pid}")).json()["meta"]["versionId"] == "1"


@pytest.mark.parametrize("version", ["\u00b2", "9" * 30, "9" * 5000, "0", "-1", "1.0"])
async def test_odd_version_numbers_in_vread_are_404_or_400(api, version):
    created = await api.post("Patient", patient(new_system()))
    response = await api.get(f"Patient/{location_id(created)}/_history/{quote(version)}")
    assert_clean_refusal(response, 400, 404)


async def test_provenance_target_that_is_not_an_array_is_400(api):
    # The gateway picks Provenance's owner from its first target; it used to index a dict.
    for target in ({"reference": "Patient/x"}, "Patient/x", ["Patient/x"], [None], 5):
        response = await api.post("Provenance", {"resourceType": "Provenance", "target": target,
                                                 "recorded": "2024-01-01T00:00:00Z", "agent": [{"who": {"display": "x"}}]})
        assert_clean_refusal(response)


@pytest.mark.parametrize(
    ("name", "value"),
    [("If-None-Exist", "identifier=urn:x|\u5f20\u4e09"), ("Prefer", "return=\u5f20"), ("If-Match", 'W/"\u00b2"'),
     ("Content-Type", "application/fhir+json; charset=\u4e2d")],
)
async def test_non_ascii_forwarded_headers_never_500(api, name, value):
    # Starlette reads header bytes as latin-1; the gateway must forward them as bytes, not fail.
    system = new_system()
    response = await api.post("Patient", patient(system), headers={name: value.encode("utf-8")})
    assert_no_5xx(response)
    assert response.status_code in (200, 201, 400, 412, 415), response.text[:300]


# --- paths --------------------------------------------------------------------------------------


async def raw_path_request(api: Any, method: str, raw_path: str, body: bytes | None = None,
                           extra_headers: dict[str, bytes] | None = None) -> httpx.Response:
    """Send the path exactly as written, straight to the ASGI app: httpx (like browsers) would
    resolve `..` and `.` before sending, but a raw HTTP client does not."""
    from urllib.parse import unquote_to_bytes

    path, _, query = raw_path.partition("?")
    headers = {k.lower(): v.encode("latin-1") for k, v in (await api.headers()).items()}
    headers.update({k.lower(): v for k, v in (extra_headers or {}).items()})
    content = body or b""
    headers["content-length"] = str(len(content)).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": unquote_to_bytes(path).decode("utf-8", "replace"), "raw_path": path.encode("latin-1"),
        "query_string": query.encode("latin-1"), "root_path": "", "server": ("127.0.0.1", 8080),
        "client": ("127.0.0.1", 50000), "headers": [(k.encode("latin-1"), v) for k, v in headers.items()],
    }
    messages = [{"type": "http.request", "body": content, "more_body": False}]
    started: dict[str, Any] = {}
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            started.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await api.system(scope, receive, send)
    request = httpx.Request(method, "http://127.0.0.1:8080/raw")
    return httpx.Response(started["status"], headers=started.get("headers", []), content=b"".join(chunks),
                          request=request)


@pytest.mark.parametrize(
    "raw_path",
    [
        "/fhir/Patient/..", "/fhir/Patient/../Observation", "/fhir/Patient/%2E%2E", "/fhir/Patient/%2e%2e%2fObservation",
        "/fhir/Patient/a%2Fb", "/fhir/Patient/a%2F..%2F..%2Fmetrics", "/fhir/Patient/..%5C..%5Cetc", "/fhir/Patient/%252e%252e",
        "/fhir/Patient/" + "a" * 20_000, "/fhir/Patient/%E6%82%A3%E8%80%85", "/fhir/Patient/%F0%9F%98%80",
        "/fhir/Patient/%E2%80%AEabc", "/fhir/Patient/abc%00", "/fhir/Patient/abc%0d%0aX-Injected:%201",
        "/fhir/Patient/%FF", "/fhir/Patient/./abc", "/fhir/Patient/abc/.", "/fhir/Patient/abc/_history/..%2F1",
        "/fhir/..%2F..%2Finternal/platform/fhir/Consent", "/fhir/%2E%2E/auth/token",
    ],
)
async def test_path_tricks_in_ids_are_refused(api, raw_path):
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        body = b'{"resourceType":"Patient","id":"abc"}' if method in ("PUT", "PATCH") else None
        response = await raw_path_request(api, method, raw_path, body)
        assert 400 <= response.status_code < 500, (method, raw_path[:80], response.status_code, response.text[:300])
        assert response.json()["resourceType"] == "OperationOutcome"
        assert response.status_code != 401  # still the FHIR API, not another route
        assert "resourceType\":\"Patient\"" not in response.text  # no resource came back


@pytest.mark.parametrize("raw_path", ["/fhir/Patient/../Organization", "/fhir/Patient/%2E%2E/Organization",
                                      "/fhir/Patient/x/..%2F..%2FOrganization", "/fhir/Patient/./../Organization"])
async def test_dot_segments_cannot_escape_the_scope_that_was_checked(api, raw_path):
    # The gateway checks the scope for the path it sees (read Patient); the HTTP client that
    # forwards it would resolve `..`, so the service would answer a search of Organization.
    token = await api.token("Organization/test-org", "system/Patient.rs")
    response = await raw_path_request(api, "GET", raw_path, extra_headers={"authorization": f"Bearer {token}".encode()})
    assert_clean_refusal(response, 400)
    assert "Bundle" not in response.text


async def test_traversal_in_reference_and_id_parameters_matches_nothing(api):
    system = new_system()
    await api.post("Patient", patient(system))
    for query in ("_id=..%2F..%2FPatient", "organization=..%2FOrganization%2Fx", "organization=Organization%2F..%2F..",
                  "general-practitioner=http%3A%2F%2F127.0.0.1%3A8080%2Ffhir%2F..%2F..%2Fadmin"):
        response = await api.get(f"Patient?identifier={system}|&{query}")
        assert_no_5xx(response)
        if response.status_code == 200:
            assert response.json()["total"] == 0, query


# --- fuzz ---------------------------------------------------------------------------------------

FUZZ_SETTINGS = settings(
    max_examples=250, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
FUZZ_TYPES = ["Patient", "Organization", "Practitioner", "Observation", "DiagnosticReport", "ServiceRequest",
              "Task", "Provenance", "Condition", "Encounter", "Appointment", "Consent", "Bundle", "Binary"]
TEMPLATES: dict[str, dict[str, Any]] = {
    "Patient": {"name": [{"family": "Fuzz"}]},
    "Organization": {"name": "Fuzz"},
    "Practitioner": {"name": [{"family": "Fuzz"}]},
    "Observation": {"status": "final", "code": {"text": "x"}},
    "DiagnosticReport": {"status": "final", "code": {"text": "x"}},
    "ServiceRequest": {"status": "active", "intent": "order", "subject": {"reference": "Patient/none"}},
    "Task": {"status": "requested", "intent": "order"},
    "Provenance": {"target": [{"reference": "Patient/none"}], "recorded": "2024-01-01T00:00:00Z",
                   "agent": [{"who": {"display": "x"}}]},
    "Condition": {"subject": {"reference": "Patient/none"}},
    "Encounter": {"status": "finished", "class": {"code": "AMB"}},
    "Appointment": {"status": "proposed", "participant": [{"status": "accepted"}]},
    "Consent": {"status": "active", "scope": {"text": "x"}, "category": [{"text": "x"}]},
    "Bundle": {"type": "collection"},
    "Binary": {"contentType": "text/plain", "data": "eA=="},
}

# Text with what breaks parsers and queries: quotes, wildcards, separators, control characters,
# NUL, RTL marks, combining marks, astral characters.
NASTY = ["'", '"', "%", "_", "\\", "|", ",", "$", ":", ".", "/", "..", "?", "&", "=", "#", "\x00", "\x01", "\n",
         "\u202e", "\u200f", "\ufeff", "\u0301", "\U0001f600", "\u738b", "' OR '1'='1", "--", ";", "*", "\u00b2",
         "9" * 400, "1e999", "-", "+", "T", "Z", "eq", "gt", "sa", "ap"]
text = st.one_of(
    st.text(max_size=20),
    st.lists(st.sampled_from(NASTY) | st.text(alphabet=string.ascii_letters + string.digits, max_size=4),
             max_size=5).map("".join),
)
numbers = st.one_of(st.integers(), st.integers(min_value=-(10**40), max_value=10**40),
                    st.floats(allow_nan=False, allow_infinity=False), st.decimals(allow_nan=False, allow_infinity=False,
                                                                                  places=None).map(lambda d: float(d)))
scalars = st.one_of(st.none(), st.booleans(), numbers, text)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(text, inner, max_size=3), max_leaves=12)


@st.composite
def resource_bodies(draw: Any, resource_type: str) -> dict[str, Any]:
    body: dict[str, Any] = {"resourceType": resource_type, **TEMPLATES[resource_type]}
    from fhir.resources import get_fhir_model_class

    elements = get_fhir_model_class(resource_type).elements_sequence()
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(elements) | text)
        body[name] = draw(json_values)
    if draw(st.booleans()):
        body.pop(draw(st.sampled_from(sorted(body))), None)
    return body


@st.composite
def encoded_bodies(draw: Any, resource_type: str) -> bytes:
    body = draw(resource_bodies(resource_type))
    raw = json.dumps(body, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    mutation = draw(st.sampled_from(["none"] * 6 + ["truncate", "splice", "bytes"]))
    if mutation == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif mutation == "splice":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(max_size=8)) + raw[at:]
    elif mutation == "bytes":
        raw = draw(st.binary(max_size=64))
    return raw


@st.composite
def search_queries(draw: Any) -> tuple[str, str]:
    resource_type = draw(st.sampled_from(FUZZ_TYPES))
    names = sorted(definitions.parameters_for(resource_type))
    params = []
    for _ in range(draw(st.integers(1, 4))):
        name = draw(st.one_of(
            st.sampled_from(names),
            st.sampled_from(["_count", "_sort", "_include", "_revinclude", "_include:iterate", "_summary", "_total",
                             "_elements", "_cursor", "_has:Observation:patient:code", "_lastUpdated", "_id"]),
            text,
        ))
        modifier = draw(st.sampled_from(["", "", "", ":exact", ":contains", ":missing", ":not", ":below", ":above",
                                         ":text", ":Patient", ":identifier", ":of-type", ":in", ":" ]))
        chain = draw(st.sampled_from(["", "", "", ".name", ".identifier", ".organization.name"]))
        value = draw(st.one_of(
            text,
            st.sampled_from(["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap", ""]).flatmap(
                lambda p: st.one_of(numbers.map(str), st.dates().map(str), st.datetimes().map(lambda d: d.isoformat()),
                                    text).map(lambda v: p + v)),
            st.sampled_from(names).map(lambda n: f"{resource_type}:{n}"),
            st.tuples(text, text, text).map("|".join),
        ))
        params.append((name + modifier + chain, value))
    return resource_type, urlencode(params, quote_via=quote)


PATH_SEGMENTS = ["Patient", "Observation", "Task", "ServiceRequest", "Provenance", "Spaceship", "_history", "_search",
                 "$validate", "$everything", "$recognition-check", "$referral-statistics", "metadata", "..", "%2E%2E",
                 "%2F", "%00", "%FF", "a" * 80, "abc", "rs-abc", "tm-abc", "1", "_history", "%24validate", ""]


HEADER_VALUES = st.one_of(
    st.sampled_from([b'W/"1"', b"*", b'W/"\xc2\xb2"', b"identifier=urn:x|\xe5\xbc\xa0", b"return=minimal",
                     b"handling=lenient", b"\xff\xfe", b"application/fhir+json; charset=\xe4\xb8\xad"]),
    st.binary(max_size=24).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
)


@st.composite
def random_requests(draw: Any) -> tuple[str, str, bytes | None, dict[str, bytes]]:
    segments = draw(st.lists(st.sampled_from(PATH_SEGMENTS) | text.map(lambda t: quote(t, safe="")), min_size=0,
                             max_size=5))
    method = draw(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE"]))
    query = draw(st.sampled_from(["", "", "_count=1", "_format=json", "_format=xml", "x=%00"]) | text.map(
        lambda t: quote(t, safe="=&")))
    resource_type = draw(st.sampled_from(FUZZ_TYPES))
    body = draw(encoded_bodies(resource_type)) if method in ("POST", "PUT", "PATCH") else None
    content_type = draw(st.sampled_from(["application/fhir+json", "application/json-patch+json",
                                         "application/merge-patch+json", "application/x-www-form-urlencoded",
                                         "text/plain", "application/fhir+json; charset=latin-1"]))
    headers = {"content-type": content_type.encode()}
    for name in draw(st.lists(st.sampled_from(["if-match", "if-none-exist", "prefer", "content-type", "accept",
                                               "x-break-glass-reason"]), max_size=2)):
        headers[name] = draw(HEADER_VALUES)
    path = "/fhir/" + "/".join(segments) + (f"?{query}" if query else "")
    return method, path, body, headers


def run_fuzz(loop: asyncio.AbstractEventLoop, test: Callable[..., Any], strategy: Any,
             send: Callable[..., Awaitable[httpx.Response]]) -> None:
    """hypothesis drives a synchronous test; each request runs on the test's event loop, where the
    in-process system lives, while this thread waits for its answer."""

    @FUZZ_SETTINGS
    @given(strategy)
    def property_test(example: Any) -> None:
        response = asyncio.run_coroutine_threadsafe(send(example), loop).result(timeout=60)
        test(response)

    property_test()


async def test_fuzz_create_and_update_bodies(api):
    headers = await api.headers(FUZZ_ORG, "system/*.cruds")

    async def send(example: tuple[str, str, bytes]) -> httpx.Response:
        method, resource_type, raw = example
        path = f"/fhir/{resource_type}" + ("/fuzz-update" if method == "PUT" else "")
        if method == "PUT":
            raw = raw.replace(b'{"resourceType"', b'{"id":"fuzz-update","resourceType"', 1)
        return await api.client.request(method, path, headers=headers, content=raw)

    strategy = st.tuples(st.sampled_from(["POST", "POST", "PUT"]), st.sampled_from(FUZZ_TYPES)).flatmap(
        lambda mt: encoded_bodies(mt[1]).map(lambda raw: (mt[0], mt[1], raw)))
    await asyncio.to_thread(run_fuzz, asyncio.get_running_loop(), assert_no_5xx, strategy, send)


async def test_fuzz_search_parameters(api):
    headers = await api.headers(FUZZ_ORG, "system/*.rs")

    async def send(example: tuple[str, str]) -> httpx.Response:
        resource_type, query = example
        if len(query) % 3 == 0:  # some as POST _search with a form body
            return await api.client.post(f"/fhir/{resource_type}/_search", content=query.encode(), headers={
                **headers, "Content-Type": "application/x-www-form-urlencoded"})
        return await api.client.get(f"/fhir/{resource_type}?{query}", headers=headers)

    await asyncio.to_thread(run_fuzz, asyncio.get_running_loop(), assert_no_5xx, search_queries(), send)


async def test_fuzz_paths_methods_and_headers(api):
    token = (await api.headers(FUZZ_ORG, "system/*.cruds"))["Authorization"].encode()

    async def send(example: tuple[str, str, bytes | None, dict[str, bytes]]) -> httpx.Response:
        method, path, body, extra = example
        return await raw_path_request(api, method, path, body, {"authorization": token, **extra})

    await asyncio.to_thread(run_fuzz, asyncio.get_running_loop(), assert_no_5xx, random_requests(), send)

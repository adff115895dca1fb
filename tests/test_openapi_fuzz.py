"""schemathesis over the OpenAPI description of the public API (docs/openapi.yaml): every
operation, positive and negative examples, against the embedded system in this process. It asserts
only that nothing is a server error and that every refusal is a FHIR OperationOutcome (an OAuth
JSON error on /auth/token); tests/test_hostile_input.py fuzzes what the description cannot say.

hypothesis drives schemathesis' strategies with `derandomize=True` and no example database, so
every run (and CI) sends the same requests. They are sent through the test client on the
session's event loop, where the in-process system lives (schemathesis' own ASGI call would run the
app on another loop). The fuzz writes as its own organization, and the ids it may write start
with `oaf-`, so it never touches another test's data.
"""

import asyncio
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

DESCRIPTION = Path(__file__).resolve().parents[1] / "docs" / "openapi.yaml"
FUZZ_ORG = "Organization/openapi-fuzz"
BASE_URL = "http://127.0.0.1:8080"
MAX_EXAMPLES = 15  # per operation and generation mode: 13 operations × 2 modes × 15 ≈ 400 requests
OAUTH_PATH = "/auth/token"
DROPPED_HEADERS = {"authorization", "user-agent", "accept-encoding", "connection", "x-schemathesis-testcaseid"}
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=list(HealthCheck),
)


def load_schema() -> Any:
    raw = yaml.safe_load(DESCRIPTION.read_text(encoding="utf-8"))
    raw["components"]["parameters"]["id"]["schema"] = {"type": "string", "pattern": "^oaf-[A-Za-z0-9]{1,12}$"}
    return schemathesis.openapi.from_dict(raw)


SCHEMA = load_schema()
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]


def test_the_description_covers_the_public_surface():
    assert {op.label for op in OPERATIONS} == {
        "GET /fhir/metadata", "GET /fhir/.well-known/smart-configuration", "POST /auth/token", "POST /fhir",
        "GET /fhir/{type}", "POST /fhir/{type}", "POST /fhir/{type}/_search", "GET /fhir/{type}/{id}",
        "PUT /fhir/{type}/{id}", "PATCH /fhir/{type}/{id}", "DELETE /fhir/{type}/{id}",
        "GET /fhir/{type}/{id}/_history", "GET /fhir/{type}/{id}/_history/{vid}",
    }


def text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    return json.dumps(value, ensure_ascii=False)


def pairs(values: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for name, value in values.items():
        for item in value if isinstance(value, list) else [value]:
            out.append((text(name), text(item)))
    return out


def encode(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")


def to_httpx(kwargs: dict[str, Any], token: str) -> dict[str, Any]:
    """schemathesis' requests-style arguments as those of an httpx request, unchanged in meaning."""
    url = urlsplit(kwargs["url"])
    target = url.path
    query = pairs(kwargs.get("params") or {})
    if query:
        target += "?" + urlencode([(encode(k), encode(v)) for k, v in query])
    # The bearer scheme makes schemathesis invent tokens; the fuzz is of what an authenticated
    # client can send, so every FHIR request carries a real one.
    headers = {k: v for k, v in kwargs["headers"].items() if k.lower() not in DROPPED_HEADERS}
    if url.path != OAUTH_PATH:
        headers["Authorization"] = f"Bearer {token}"
    out: dict[str, Any] = {"method": kwargs["method"], "url": target,
                           "headers": [(encode(k), encode(text(v))) for k, v in headers.items()]}
    if "json" in kwargs:
        out["content"] = encode(json.dumps(kwargs["json"]))
    elif isinstance(kwargs.get("data"), dict):
        out["content"] = urlencode([(encode(k), encode(v)) for k, v in pairs(kwargs["data"])]).encode()
    elif kwargs.get("data") is not None:
        data = kwargs["data"]
        out["content"] = data if isinstance(data, bytes) else encode(text(data))
    assert not kwargs.get("files"), kwargs  # no multipart operation in the description
    return out


def check(request: dict[str, Any], response: httpx.Response) -> None:
    where = (request["method"], request["url"][:300], response.status_code, response.text[:300])
    assert response.status_code < 500, where
    if 400 <= response.status_code < 500:
        body = response.json()
        if request["url"].startswith(OAUTH_PATH):
            assert isinstance(body.get("error"), str), where
        else:
            assert body.get("resourceType") == "OperationOutcome" and body.get("issue"), where


def fuzz_operation(loop: asyncio.AbstractEventLoop, client: httpx.AsyncClient, token: str, operation: Any,
                   mode: GenerationMode) -> int:
    sent = 0

    @FUZZ_SETTINGS
    @given(operation.as_strategy(generation_mode=mode))
    def property_test(case: Any) -> None:
        nonlocal sent
        request = to_httpx(case.as_transport_kwargs(base_url=BASE_URL), token)
        response = asyncio.run_coroutine_threadsafe(client.request(**request), loop).result(timeout=60)
        sent += 1
        check(request, response)

    try:
        property_test()
    except Unsatisfiable:
        # Nothing to send that the description forbids (an operation without parameters or body).
        assert mode is GenerationMode.NEGATIVE and sent == 0, operation.label
    return sent


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
async def test_schemathesis_finds_no_server_error(api, mode):
    token = await api.token(FUZZ_ORG, "system/*.cruds")
    loop = asyncio.get_running_loop()
    silent = set()
    for operation in OPERATIONS:
        if not await asyncio.to_thread(fuzz_operation, loop, api.client, token, operation, mode):
            silent.add(operation.label)
    assert silent <= ({"GET /fhir/.well-known/smart-configuration"} if mode is GenerationMode.NEGATIVE else set())

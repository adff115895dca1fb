"""The request middleware's counters and access log."""

import logging

import httpx
import pytest
from prometheus_client import generate_latest

from servicekit.observability import Metrics, RequestContextMiddleware


async def _answer(scope, receive, send) -> None:
    status = 404 if scope["path"].endswith("missing") else 200
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def _client(metrics: Metrics) -> httpx.AsyncClient:
    app = RequestContextMiddleware(_answer, service="probe", metrics=metrics)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://probe")


def _sample(metrics: Metrics, line_start: str) -> float:
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_each_method_and_status_is_counted_in_its_own_series() -> None:
    metrics = Metrics("probe")
    async with _client(metrics) as client:
        for path in ("/fhir/Patient/1", "/fhir/Patient/2", "/fhir/missing"):
            await client.get(path)
        await client.post("/fhir/Patient", content=b"{}")
    requests = 'alliance_http_requests_total{method="%s",service="probe",status="%s"}'
    assert _sample(metrics, requests % ("GET", "200")) == 2
    assert _sample(metrics, requests % ("GET", "404")) == 1
    assert _sample(metrics, requests % ("POST", "200")) == 1
    assert _sample(metrics, 'alliance_http_request_seconds_count{method="GET",service="probe"}') == 3


@pytest.mark.parametrize("level, written", [(logging.INFO, True), (logging.WARNING, False)])
async def test_the_access_log_names_the_type_never_the_id(caplog, level: int, written: bool) -> None:
    caplog.set_level(level, logger="alliance.probe")
    async with _client(Metrics("probe")) as client:
        await client.get("/fhir/Patient/p-4711?identifier=110101199001011234")
    records = [r for r in caplog.records if r.name == "alliance.probe"]
    assert len(records) == (1 if written else 0)
    if written:
        assert (records[0].route, records[0].status, records[0].method) == ("/Patient", 200, "GET")
        assert "p-4711" not in str(records[0].__dict__) and "1101011990" not in str(records[0].__dict__)

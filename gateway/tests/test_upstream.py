"""The gateway's HTTP client to remote services: bytes pass through unchanged, failures are FHIR errors."""

import socket

import pytest
from aiohttp import web

from fhirkit.errors import UpstreamTimeout, UpstreamUnavailable
from gateway.upstream import Upstreams


async def _echo(request: web.Request) -> web.Response:
    if request.path.endswith("/slow"):
        import asyncio

        await asyncio.sleep(2)
    body = await request.read()
    headers = {"ETag": 'W/"3"', "Set-Cookie": "a=1"}
    text = f"{request.method} {request.raw_path} {request.headers.get('If-None-Exist', '')} {len(body)}"
    return web.Response(body=text.encode(), headers=headers, status=201)


@pytest.fixture
async def service():
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/"
    await runner.cleanup()


async def test_path_query_headers_and_body_pass_through_unchanged(service: str) -> None:
    upstreams = Upstreams({"directory": service})
    try:
        path = "/fhir/Patient?name=%E7%8E%8B&_count=2"
        condition = "identifier=http://x|王".encode().decode("latin-1").encode("latin-1")  # as the gateway holds it
        status, headers, body = await upstreams.request(
            "directory", "POST", path, {"If-None-Exist": condition}, b'{"resourceType":"Patient"}'
        )
    finally:
        await upstreams.close()
    assert status == 201
    assert body.decode() == f"POST {path} identifier=http://x|王 26"
    assert headers["etag"] == 'W/"3"'


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_an_unreachable_service_is_upstream_unavailable() -> None:
    upstreams = Upstreams({"referral": f"http://127.0.0.1:{_free_port()}"})
    try:
        with pytest.raises(UpstreamUnavailable) as raised:
            await upstreams.request("referral", "GET", "/fhir/Task", {}, b"")
    finally:
        await upstreams.close()
    assert raised.value.status_code == 503 and "referral" in raised.value.diagnostics


async def test_a_slow_service_is_upstream_timeout(service: str) -> None:
    upstreams = Upstreams({"telemedicine": service}, timeout_seconds=0.3)
    try:
        with pytest.raises(UpstreamTimeout) as raised:
            await upstreams.request("telemedicine", "GET", "/fhir/slow", {}, b"")
    finally:
        await upstreams.close()
    assert raised.value.status_code == 504

"""Calling a service's ASGI app in the same process, without an HTTP client in between.

In the embedded mode the gateway reaches each service in-process. Going through httpx's
ASGITransport builds a client request, a transport request and a response object for every hop;
on a read by id that was about a tenth of the CPU. The service still sees an ordinary HTTP
request (the same headers), so both modes run the same code behind it; only the caller's identity
comes in the scope (`IN_PROCESS_CALLER`) rather than as a signed header.
"""

import asyncio
from typing import Any
from urllib.parse import unquote

from fhirkit.api.interactions import PARSED_BODY
from servicekit.identity import IN_PROCESS_CALLER, CallerIdentity

Headers = dict[str, str]


async def call_asgi(
    app: Any, method: str, path: str, headers: dict[str, str | bytes], content: bytes, *, host: str,
    parsed: Any = None, caller: CallerIdentity | None = None,
) -> tuple[int, Headers, bytes]:
    """Send one request to `app`; returns status, headers (lower-case names; repeated ones
    joined with ", " as httpx does) and the whole body. `parsed`: the caller's parse of `content`,
    handed over so that the app does not parse it again (the caller must not use it afterwards:
    the app may change it). `caller`: the identity the request is made for, handed over instead of
    a signed identity header (`IN_PROCESS_CALLER`)."""
    raw_path, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(raw_path),
        "raw_path": raw_path.encode("latin-1"),
        "query_string": query.encode("latin-1"),
        "root_path": "",
        "headers": [(b"host", host.encode()), (b"content-length", str(len(content)).encode()),
                    *((name.lower().encode("latin-1"), _bytes(value)) for name, value in headers.items())],
        "client": ("127.0.0.1", 0),
        "server": (host, 80),
        "extensions": {},
    }
    if parsed is not None:
        scope["extensions"][PARSED_BODY] = (content, parsed)
    if caller is not None:
        scope["extensions"][IN_PROCESS_CALLER] = caller
    sent = False
    complete = asyncio.Event()
    status = 500
    response_headers: Headers = {}
    body: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": content, "more_body": False}
        await complete.wait()  # a streaming response listens for a disconnect meanwhile
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            for name, value in message.get("headers", ()):
                key, text = name.decode("latin-1").lower(), value.decode("latin-1")
                response_headers[key] = f"{response_headers[key]}, {text}" if key in response_headers else text
        elif message["type"] == "http.response.body":
            body.append(message.get("body", b""))
            if not message.get("more_body", False):
                complete.set()

    try:
        await app(scope, receive, send)
    finally:
        complete.set()
    return status, response_headers, b"".join(body)


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")

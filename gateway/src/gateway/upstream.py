"""HTTP from the gateway to the services in distributed mode, on aiohttp.

The gateway makes one such request for every FHIR request it passes on, so the client's own cost
is most of the hop it adds. A keep-alive GET of a small resource from a local server cost ~1.4 ms
of CPU through httpx and ~0.2 ms through aiohttp on this 2-core machine (bench/README.md). httpx
stays for everything else (health checks, peers, tests).
"""

from typing import Any

import aiohttp
from yarl import URL

from fhirkit.errors import UpstreamTimeout, UpstreamUnavailable

Headers = dict[str, str]


class Upstreams:
    """One aiohttp session per service, opened on first use (it belongs to the running loop)."""

    def __init__(self, urls: dict[str, str], *, timeout_seconds: float = 30.0, max_connections: int = 100) -> None:
        self.urls = {name: url.rstrip("/") for name, url in urls.items()}
        self.timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self.max_connections = max_connections
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def _session(self, service: str) -> aiohttp.ClientSession:
        session = self._sessions.get(service)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(limit=self.max_connections)
            session = aiohttp.ClientSession(timeout=self.timeout, connector=connector, auto_decompress=False)
            self._sessions[service] = session
        return session

    async def request(
        self, service: str, method: str, path: str, headers: dict[str, str | bytes], content: bytes
    ) -> tuple[int, Headers, bytes]:
        """Status, headers (lower-case names, repeated ones joined with ", ") and the whole body."""
        # encoded=True: the path and query go as the client sent them (no re-quoting).
        url = URL(self.urls[service] + path, encoded=True)
        try:
            async with self._session(service).request(
                method, url, data=content or None, headers=_text_headers(headers)
            ) as response:
                body = await response.read()
                answered: Headers = {}
                for name, value in response.headers.items():
                    key = name.lower()
                    answered[key] = f"{answered[key]}, {value}" if key in answered else value
                return response.status, answered, body
        except TimeoutError:
            raise UpstreamTimeout(f"The {service} service did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"The {service} service is unavailable ({type(exc).__name__})") from None

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()


def _text_headers(headers: dict[str, str | bytes]) -> dict[str, Any]:
    # aiohttp writes header values as UTF-8; the gateway holds them as the bytes the client sent.
    return {name: value.decode("utf-8", "replace") if isinstance(value, bytes) else value
            for name, value in headers.items()}

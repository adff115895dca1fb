"""Calls between services: existence checks of referenced resources, through the owner's API.

Never by reading another service's tables. In the embedded mode the transport is the sibling's
in-process ASGI app; in distributed mode it is HTTP to `ALLIANCE_<SERVICE>_URL`. Positive answers
are cached briefly: a resource that existed a few seconds ago may be referenced.
"""

import time
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
import orjson

from fhirkit.errors import UpstreamTimeout, UpstreamUnavailable
from fhirkit.resources import ID_PATTERN
from servicekit import topology
from servicekit.identity import IDENTITY_HEADER, CallerIdentity, sign_identity
from servicekit.inprocess import call_asgi

IDS_PER_SEARCH = 100

SYSTEM_IDENTITY = CallerIdentity(
    client_id="alliance-internal", organization="Organization/alliance-system", scopes=("system/*.cruds",), level=None, roles=("system",)
)


@dataclass(frozen=True)
class Answer:
    """What another service answered: its status and body."""

    status_code: int
    content: bytes


class Peers:
    def __init__(
        self,
        me: str,
        secret: bytes,
        urls: MutableMapping[str, str | None],
        transports: MutableMapping[str, httpx.AsyncBaseTransport] | None = None,
        *,
        cache_seconds: float = 30.0,
    ) -> None:
        self.me = me
        self.secret = secret
        self.urls = urls
        self.transports = transports if transports is not None else {}
        self.cache_seconds = cache_seconds
        self._seen: dict[tuple[str, str], float] = {}
        self._read_cache: dict[tuple[str, str], tuple[float, dict[str, Any] | None]] = {}
        self._clients: dict[str, httpx.AsyncClient] = {}

    def holds(self, resource_type: str) -> bool:
        return resource_type in topology.ALL_TYPES

    async def exists(self, resource_type: str, resource_id: str) -> bool:
        key = (resource_type, resource_id)
        if self._seen_lately(key):
            return True
        for service in self._candidates(resource_type, resource_id):
            if await self._ask(service, resource_type, resource_id):
                self._seen[key] = time.monotonic()
                return True
        return False

    async def exists_many(self, keys: Iterable[tuple[str, str]]) -> None:
        """Learn at once which of many resources exist: one search by `_id` per owning service
        and type (100 ids a search) instead of a read each. What is found is remembered as
        `exists` remembers it; what is not is left for `exists` to ask (and refuse) itself."""
        wanted: dict[tuple[str, str], set[str]] = {}
        for resource_type, resource_id in keys:
            if self._seen_lately((resource_type, resource_id)) or not ID_PATTERN.fullmatch(resource_id):
                continue
            candidates = self._candidates(resource_type, resource_id)
            if len(candidates) == 1:
                wanted.setdefault((candidates[0], resource_type), set()).add(resource_id)
        for (service, resource_type), ids in wanted.items():
            ordered = sorted(ids)
            for start in range(0, len(ordered), IDS_PER_SEARCH):
                chunk = ordered[start:start + IDS_PER_SEARCH]
                query = urlencode({"_id": ",".join(chunk), "_count": len(chunk), "_elements": "id", "_total": "none"})
                response = await self._get(service, f"/fhir/{resource_type}?{query}")
                if response.status_code != 200:
                    return  # each is asked on its own, as without this
                for entry in orjson.loads(response.content).get("entry", []):
                    found = (entry.get("resource") or {}).get("id")
                    if found in ids:
                        self._seen[(resource_type, found)] = time.monotonic()

    def _seen_lately(self, key: tuple[str, str]) -> bool:
        seen = self._seen.get(key)
        return seen is not None and time.monotonic() - seen < self.cache_seconds

    async def read(self, resource_type: str, resource_id: str, *, fresh: bool = False) -> dict[str, Any] | None:
        """The current content of a resource another service holds (None: absent), cached briefly;
        `fresh` for what must never be stale (a Consent that may just have been withdrawn)."""
        key = (resource_type, resource_id)
        cached = self._read_cache.get(key)
        if not fresh and cached is not None and time.monotonic() - cached[0] < self.cache_seconds:
            return cached[1]
        content = None
        for service in self._candidates(resource_type, resource_id):
            response = await self._get(service, f"/fhir/{resource_type}/{resource_id}")
            if response.status_code == 200:
                content = orjson.loads(response.content)
                break
            if response.status_code not in (404, 410):
                raise UpstreamUnavailable(f"The {service} service answered {response.status_code} reading a reference")
        self._read_cache[key] = (time.monotonic(), content)
        return content

    async def search(
        self, resource_type: str, params: list[tuple[str, str]], *, service: str | None = None
    ) -> list[dict[str, Any]]:
        """The first page of a search at the owning service (callers ask narrow questions). For a
        type several services hold (Provenance, Task, ServiceRequest) `service` names the one to ask."""

        results: list[dict[str, Any]] = []
        services = [service] if service else [n for n in topology.owners(resource_type) if n != self.me][:1]
        for owner in services:
            response = await self._get(owner, f"/fhir/{resource_type}?{urlencode(params)}")
            if response.status_code != 200:
                raise UpstreamUnavailable(f"The {owner} service answered {response.status_code} to a search")
            results = [e["resource"] for e in orjson.loads(response.content).get("entry", []) if "resource" in e]
        return results

    def _candidates(self, resource_type: str, resource_id: str) -> list[str]:
        by_prefix = topology.owner_by_id(resource_type, resource_id)
        names = [by_prefix] if by_prefix else topology.owners(resource_type)
        return [n for n in names if n != self.me]

    def client(self, service: str) -> httpx.AsyncClient:
        if service not in self._clients:
            transport = self.transports.get(service)
            base = "http://" + service if transport is not None else (self.urls.get(service) or "")
            if not base:
                raise UpstreamUnavailable(f"No address is configured for the {service} service")
            self._clients[service] = httpx.AsyncClient(base_url=base, transport=transport, timeout=10.0)
        return self._clients[service]

    async def _get(self, service: str, path: str) -> Answer:
        transport = self.transports.get(service)
        if isinstance(transport, httpx.ASGITransport):
            # A sibling in this process: its app is called directly (servicekit.inprocess), as the
            # gateway calls it. httpx's client and ASGI transport around it cost more than the
            # read it asks for, and their check for trio retried a failing import every call.
            status, _, body = await call_asgi(transport.app, "GET", path, {}, b"", host=service, caller=SYSTEM_IDENTITY)
            return Answer(status, body)
        headers = {IDENTITY_HEADER: sign_identity(SYSTEM_IDENTITY, self.secret)}
        try:
            response = await self.client(service).get(path, headers=headers)
            return Answer(response.status_code, response.content)
        except httpx.TimeoutException:
            raise UpstreamTimeout(f"The {service} service did not answer in time") from None
        except httpx.HTTPError as exc:
            raise UpstreamUnavailable(f"The {service} service is unreachable: {type(exc).__name__}") from None

    async def _ask(self, service: str, resource_type: str, resource_id: str) -> bool:
        response = await self._get(service, f"/fhir/{resource_type}/{resource_id}")
        if response.status_code == 200:
            return True
        if response.status_code in (404, 410):
            return False
        raise UpstreamUnavailable(f"The {service} service answered {response.status_code} checking a reference")

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

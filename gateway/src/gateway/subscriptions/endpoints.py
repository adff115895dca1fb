"""Rest-hook endpoints: the configured allow-list, and an HTTP transport that enforces it.

The list holds networks (`127.0.0.0/8`, `10.20.0.0/16`, `::1/128`), not host names: what counts is
the address a name resolves to. A subscription is refused when its host resolves to any address
outside the list, and every delivery checks again at connection time, on the very addresses it
connects to, so a name that later resolves elsewhere (DNS rebinding) reaches nothing off the list.
"""

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

RESOLVE_TIMEOUT_SECONDS = 5.0

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class EndpointNotAllowed(Exception):
    """The endpoint is malformed, does not resolve, or resolves outside the allow-list."""


class AllowList:
    def __init__(self, entries: Iterable[str], *, require_https: bool = False) -> None:
        self.networks: tuple[Network, ...] = tuple(ipaddress.ip_network(e.strip(), strict=False) for e in entries)
        self.require_https = require_https

    def permits(self, address: str) -> bool:
        ip = _normalized(ipaddress.ip_address(address.split("%")[0]))
        return any(ip.version == net.version and ip in net for net in self.networks)

    def check_url(self, url: str) -> tuple[str, int]:
        """(host, port) of a well-formed endpoint URL; EndpointNotAllowed otherwise."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise EndpointNotAllowed(f"'{url[:200]}' is not a valid URL") from exc
        schemes = ("https",) if self.require_https else ("http", "https")
        if parts.scheme not in schemes:
            raise EndpointNotAllowed(f"The endpoint must be an {' or '.join(schemes)} URL")
        if not parts.hostname:
            raise EndpointNotAllowed("The endpoint has no host")
        if parts.username or parts.password:
            raise EndpointNotAllowed("Credentials go in channel headers, not in the endpoint URL")
        return parts.hostname, port or (443 if parts.scheme == "https" else 80)

    async def resolve(self, host: str, port: int) -> list[str]:
        """Every address `host` resolves to, all of them inside the allow-list."""
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM),
                RESOLVE_TIMEOUT_SECONDS,
            )
        except (OSError, TimeoutError) as exc:
            raise EndpointNotAllowed(f"The endpoint host '{host[:100]}' does not resolve") from exc
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        refused = [address for address in addresses if not self.permits(address)]
        if refused or not addresses:
            raise EndpointNotAllowed(
                f"The endpoint host '{host[:100]}' resolves to {', '.join(refused or ['nothing'])}, "
                "outside the allowed networks (ALLIANCE_SUBSCRIPTION_ENDPOINT_ALLOW_LIST)"
            )
        return addresses

    async def check(self, url: str) -> None:
        host, port = self.check_url(url)
        await self.resolve(host, port)


def _normalized(ip: Address) -> Address:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
    return ip


class _AllowListBackend(httpcore.AsyncNetworkBackend):
    """Resolves, checks and connects to the checked address itself (TLS still names the host)."""

    def __init__(self, allow_list: AllowList) -> None:
        self.allow_list = allow_list
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            addresses = await self.allow_list.resolve(host, port)
        except EndpointNotAllowed as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        error: Exception | None = None
        for address in addresses:
            try:
                return await self.inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("Unix sockets are not rest-hook endpoints")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def delivery_client(allow_list: AllowList) -> httpx.AsyncClient:
    """The only HTTP client that talks to subscribers: no redirects, no proxies from the
    environment, and the allow-list checked on every connection."""
    transport = httpx.AsyncHTTPTransport(retries=0, trust_env=False)
    # httpx builds its pool without a way to pass a network backend; swap in one that does.
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(), max_connections=50, network_backend=_AllowListBackend(allow_list)
    )
    return httpx.AsyncClient(transport=transport, follow_redirects=False, trust_env=False)

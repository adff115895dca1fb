"""`alliance serve --workers N` on Linux: N server processes, each accepting on its own socket.

uvicorn's own supervisor binds one socket and shares it with its workers, and whichever worker
wakes first accepts every connection waiting: 16 connections opened at once landed 15 on one
worker and 1 on the other, and a keep-alive connection stays with its worker, so one core queued
fifteen clients while the other served one. Here each worker binds its own socket to the same
address with SO_REUSEPORT, and the kernel spreads new connections over them.

The kernel hashes each new connection to a socket, so a few long-lived connections split
unevenly (16 went 11:5 and 10:6 as often as 8:8) and the fuller worker queues its clients longer.
The workers therefore keep their connection counts in shared memory, and one holding more than
its share closes the surplus after their next response (`Connection: close`): the clients
reconnect and the kernel hashes them anew (`ConnectionBalance`).

The parent only supervises: it starts the workers (spawned, one `uvicorn.Server` each), starts
again one that dies, and on SIGINT or SIGTERM asks every worker to stop (each finishes its
requests and its lifespan shutdown) and waits for them. A worker whose parent dies (even
killed) is sent SIGTERM by the kernel: no orphan goes on serving the port.
"""

import ctypes
import logging
import math
import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, MutableSequence
from multiprocessing.process import BaseProcess
from typing import Any

log = logging.getLogger("alliance.serve")

STOP_SECONDS = 30.0  # how long a worker may take to finish its requests before it is killed
RESTART_PAUSE = 1.0  # between a worker's death and its replacement (a crash loop must not spin)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) that other processes may bind too (SO_REUSEPORT); uvicorn
    starts listening on it."""
    sock = _bound(host, port, shared=True)
    sock.set_inheritable(True)
    return sock


def address_free(host: str, port: int) -> None:
    """Raise OSError unless nothing listens on (host, port). Bound without SO_REUSEPORT: a
    socket that sets it would join another server's workers on the port instead of failing."""
    _bound(host, port, shared=False).close()


def _bound(host: str, port: int, *, shared: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class ConnectionBalance:
    """One worker's view of every worker's open connections (`counts`, shared memory, a slot
    each). `update` (every 0.1 s) records its own and how many it holds beyond its share, the
    total divided by the workers, rounded up; `take` says whether to close the connection of the
    response being sent, one surplus connection each."""

    def __init__(self, counts: MutableSequence[int], slot: int) -> None:
        self.counts = counts
        self.slot = slot
        self.surplus = 0

    def update(self, held: int) -> None:
        self.counts[self.slot] = held
        share = math.ceil(sum(self.counts) / len(self.counts))
        self.surplus = max(0, held - share)

    def take(self) -> bool:
        if self.surplus <= 0:
            return False
        self.surplus -= 1
        return True


class ShedSurplusConnections:
    """ASGI middleware: `Connection: close` on a response while the worker holds more than its
    share of the connections (uvicorn then closes the connection after that response)."""

    def __init__(self, app: Callable[..., Awaitable[None]], balance: ConnectionBalance) -> None:
        self.app = app
        self.balance = balance

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.balance.take():
            await self.app(scope, receive, send)
            return

        async def closing(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing)


def serve_workers(app: str, host: str, port: int, workers: int, **options: Any) -> None:
    """Run `workers` uvicorn servers of the app factory `app` on (host, port) until SIGINT/SIGTERM."""
    address_free(host, port)
    context = multiprocessing.get_context("spawn")
    stopping = threading.Event()
    counts = context.Array("i", workers, lock=False)  # each worker's open connections

    def start(slot: int) -> BaseProcess:
        counts[slot] = 0
        process = context.Process(target=_worker, args=(app, host, port, options, os.getpid(), counts, slot),
                                  daemon=False)
        process.start()
        return process

    processes = [start(slot) for slot in range(workers)]
    previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stopping.wait(0.5):
            for index, process in enumerate(processes):
                if not process.is_alive() and not stopping.is_set():
                    log.error("worker %s exited with %s; starting another", process.pid, process.exitcode)
                    stopping.wait(RESTART_PAUSE)
                    if not stopping.is_set():
                        processes[index] = start(index)
    finally:
        _stop(processes)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(processes: list[BaseProcess]) -> None:
    for process in processes:
        if process.is_alive() and process.pid is not None:
            os.kill(process.pid, signal.SIGTERM)  # uvicorn: finish the requests, run the shutdown
    for process in processes:
        process.join(STOP_SECONDS)
        if process.is_alive():
            log.error("worker %s did not stop in %.0f s; killing it", process.pid, STOP_SECONDS)
            process.kill()
            process.join()


def _worker(app: str, host: str, port: int, options: dict[str, Any], parent: int, counts: MutableSequence[int],
            slot: int) -> None:
    import uvicorn
    from uvicorn.importer import import_from_string

    _stop_with(parent)
    balance = ConnectionBalance(counts, slot)

    class BalancedServer(uvicorn.Server):
        async def on_tick(self, counter: int) -> bool:  # every 0.1 s, in the server's loop
            balance.update(len(self.server_state.connections))
            return await super().on_tick(counter)

    def balanced_app() -> Any:
        return ShedSurplusConnections(import_from_string(app)(), balance)

    config = uvicorn.Config(balanced_app, host=host, port=port, factory=True, **options)
    BalancedServer(config).run(sockets=[listening_socket(host, port)])


def _stop_with(parent: int) -> None:
    """SIGTERM this worker when its parent dies, even killed (Linux's PR_SET_PDEATHSIG): an orphan
    would go on serving the port beside the next server."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the call
        os.kill(os.getpid(), signal.SIGTERM)

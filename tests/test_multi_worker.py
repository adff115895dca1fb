"""`alliance serve --workers 2` as an operator runs it: two worker processes on one set of
databases (SQLite files; fresh PostgreSQL databases when ALLIANCE_TEST_POSTGRES_URL is set).

Nothing of ours is mocked. Requests go over TCP on fresh connections, which the kernel hands to
either worker; a keep-alive connection stays with one. Which worker a connection reached is read
from its `/metrics` (per process): each worker is tagged once with a distinct number of OPTIONS
requests, a method nothing else sends. The checks:

* concurrent writes land on both workers, and every event they cause is published and handled
  once in effect: a subscribed receiver gets each referral Task update exactly once, numbered
  1..N without gaps or repeats, although both workers run dispatchers, consumers and delivery;
* an overdue referral is escalated once although both workers sweep every second;
* a client assertion's `jti` used on one worker is refused on the other;
* the audit trail, appended by both workers' writers, is one chain (`alliance audit verify`);
* connections opened while a worker is busy still reach it (each accepts on its own socket);
* a worker SIGKILLed while it leads the referral outbox (on SQLite: the lease's holder) is
  replaced at once by the other for dispatching: the next events arrive once each, in seconds;
  and the parent starts a new worker in its place;
* SIGTERM stops the workers and the parent exits 0; a killed parent's workers stop too; a second
  server on the same port refuses to start.

The development secrets are not given: the workers must agree on the ones `serve` generates.
Two quick in-process tests pin down the SQLite dispatcher lease itself (one leader, take-over
after a clean stop, and at once after its holder died).
"""

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests import live
from tests.live import NotificationReceiver as Receiver
from tests.live import wait_until
from tests.support import FULL_SCOPE, postgres_databases, system_settings

WORKERS = 2
BASE = "http://county-alliance.org/fhir"
BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
LEVEL = f"{BASE}/CodeSystem/facility-level"
CATEGORY = f"{BASE}/CodeSystem/referral-category"
TASK_CODE = f"{BASE}/CodeSystem/task-code"
ESCALATION = f"{BASE}/StructureDefinition/escalation"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FHIR_JSON = "application/fhir+json"

CITY = "Organization/mw-city"
COUNTY = "Organization/mw-county"
STROKE = "Organization/mw-stroke-center"
TOWNSHIP = "Organization/mw-township"
ADMIN = "Organization/mw-admin"

WAIT = 30.0


# --- a receiver of notifications ---------------------------------------------------------------


# --- the server --------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    env: dict[str, str]
    platform_url: str
    pid: int  # of `alliance serve`, the workers' parent
    postgres: bool
    tokens: dict[str, str] = field(default_factory=dict)
    patient: str = ""
    tagged: int = 0  # workers tagged so far (see worker_of)

    def headers(self, organization: str, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[organization]}", "Content-Type": FHIR_JSON, **extra}

    def call(self, organization: str, method: str, path: str, body: Any = None, *,
             client: httpx.Client | None = None, **headers: str) -> httpx.Response:
        """One request on `client`, or on a fresh connection (which either worker may take)."""
        content = json.dumps(body).encode() if body is not None else None
        if client is not None:
            return client.request(method, f"/fhir/{path}", content=content, headers=self.headers(organization, **headers))
        with httpx.Client(base_url=self.url, timeout=60) as fresh:
            return fresh.request(method, f"/fhir/{path}", content=content, headers=self.headers(organization, **headers))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data_dir: Path = tmp_path_factory.mktemp("multi-worker")
    postgres = os.environ.get("ALLIANCE_TEST_POSTGRES_URL")
    with _databases(postgres) as urls:
        settings = system_settings(data_dir, urls)
        _migrate(settings)
        port = live.free_port()
        env = live.environment(
            data_dir, urls,
            ALLIANCE_PUBLIC_BASE_URL=f"http://127.0.0.1:{port}/fhir",
            ALLIANCE_REFERRAL_SWEEP_SECONDS="1",
            ALLIANCE_EVENTS_POLL_INTERVAL_SECONDS="0.2",
            ALLIANCE_SUBSCRIPTION_POLL_INTERVAL_SECONDS="0.2",
        )
        for secret in live.SECRETS:  # generated by `serve`, once for both workers
            env.pop(secret)
        with _serving(env, port) as (url, pid):
            platform = settings.database_url("platform")
            running = Server(url, env, platform, pid, bool(urls))
            for organization, level in ((ADMIN, "county"), (COUNTY, "county"), (STROKE, "county"),
                                        (TOWNSHIP, "township")):
                running.tokens[organization] = live.token(url, asyncio.run(_register(platform, organization, level)))
            _alliance(running)
            yield running


def _databases(postgres: str | None) -> Any:
    return postgres_databases(postgres, f"mw{uuid.uuid4().hex[:8]}") if postgres else nullcontext()


def _migrate(settings: Any) -> None:
    from gateway.app import service_definitions
    from servicekit.migrations import upgrade

    for name, definition in service_definitions().items():
        upgrade(settings.database_url(name), definition.all_lineages)


@contextmanager
def _serving(env: dict[str, str], port: int) -> Iterator[tuple[str, int]]:
    """`alliance serve --workers 2`: the URL and the workers' parent's pid."""
    with live.server_process(env, port, "--workers", str(WORKERS), timeout=90) as (url, process):
        yield url, process.pid


async def _register(platform_url: str, organization: str, level: str, jwks: dict[str, Any] | None = None) -> dict[str, str]:
    from gateway.auth import create_client
    from servicekit.db import Database

    database = Database(platform_url)
    await database.start()
    try:
        client = await create_client(database.engine, organization=organization, scope=FULL_SCOPE,
                                     name=organization, level=level, jwks=jwks)
    finally:
        await database.stop()
    return {"client_id": client.client_id, "client_secret": client.client_secret or "", "scope": FULL_SCOPE}


def _alliance(server: Server) -> None:
    for org, level, parent in ((CITY, "city-hospital", None), (COUNTY, "county-hospital", CITY),
                               (STROKE, "stroke-center", COUNTY), (TOWNSHIP, "township-health-center", COUNTY)):
        org_id = org.split("/")[1]
        body: dict[str, Any] = {"resourceType": "Organization", "id": org_id, "name": org_id,
                                "type": [{"coding": [{"system": LEVEL, "code": level}]}]}
        if parent:
            body["partOf"] = {"reference": parent}
        response = server.call(ADMIN, "PUT", f"Organization/{org_id}", body)
        assert response.status_code in (200, 201), response.text
    patient = server.call(TOWNSHIP, "POST", "Patient", {"resourceType": "Patient", "name": [{"family": "多进程"}]})
    assert patient.status_code == 201, patient.text
    server.patient = f"Patient/{patient.json()['id']}"


# --- which worker answered ----------------------------------------------------------------------


def _counters(metrics: str) -> list[tuple[dict[str, str], float]]:
    found = []
    for line in metrics.splitlines():
        if line.startswith("alliance_http_requests_total{"):
            labels, value = line[len("alliance_http_requests_total{"):].rsplit("} ", 1)
            found.append((dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value)))
    return found


def _count(metrics: str, **labels: str) -> int:
    return int(sum(v for found, v in _counters(metrics) if all(found.get(k) == w for k, w in labels.items())))


def worker_of(server: Server, client: httpx.Client) -> tuple[int, str]:
    """The worker holding `client`'s connection (1..WORKERS) and that worker's metrics."""
    metrics = client.get("/metrics").text
    tag = _count(metrics, method="OPTIONS")
    if tag == 0:  # a worker not met yet: tag it
        server.tagged += 1
        tag = server.tagged
        for _ in range(tag):
            client.request("OPTIONS", "/healthz")
        metrics = client.get("/metrics").text
        assert _count(metrics, method="OPTIONS") == tag, "the tagging requests went elsewhere"
    return tag, metrics


def connections_to_each_worker(server: Server) -> dict[int, httpx.Client]:
    """A keep-alive connection to every worker (use it within the keep-alive timeout, 5 s)."""
    for _ in range(5):
        found: dict[int, httpx.Client] = {}
        for _ in range(200):
            client = httpx.Client(base_url=server.url, timeout=60)
            worker, _metrics = worker_of(server, client)
            if worker in found:
                client.close()
                continue
            found[worker] = client
            if len(found) == WORKERS:
                break
        # A connection that idled past the keep-alive timeout while the others were sought
        # would reconnect, maybe to another worker: check them all again, now.
        if len(found) == WORKERS and all(worker_of(server, c)[0] == w for w, c in found.items()):
            return found
        for client in found.values():
            client.close()
    raise AssertionError(f"could not hold a connection to each of the {WORKERS} workers")


def per_worker(server: Server, **labels: str) -> dict[int, int]:
    """Each worker's count of requests with these labels (from fresh connections until every
    worker has answered one)."""
    counts: dict[int, int] = {}
    for _ in range(200):
        with httpx.Client(base_url=server.url, timeout=60) as client:
            worker, metrics = worker_of(server, client)
        counts.setdefault(worker, _count(metrics, **labels))
        if len(counts) == WORKERS:
            return counts
    raise AssertionError(f"only workers {sorted(counts)} answered 200 fresh connections")


# --- referrals -------------------------------------------------------------------------------


def refer(server: Server, owner: str, *, deadline: str | None = None) -> str:
    """A referral from the township centre (ServiceRequest + Task, one fresh connection)."""
    patient = server.patient
    with httpx.Client(base_url=server.url, timeout=60) as client:
        request = server.call(TOWNSHIP, "POST", "ServiceRequest", {
            "resourceType": "ServiceRequest", "status": "active", "intent": "order", "priority": "urgent",
            "category": [{"coding": [{"system": CATEGORY, "code": "upward-referral"}]}],
            "subject": {"reference": patient}, "requester": {"reference": TOWNSHIP},
            "performer": [{"reference": owner}], "reasonCode": [{"text": "反复胸闷一周"}],
        }, client=client)
        assert request.status_code == 201, request.text
        task: dict[str, Any] = {
            "resourceType": "Task", "status": "requested", "intent": "order", "priority": "urgent",
            "code": {"coding": [{"system": TASK_CODE, "code": "referral"}]},
            "focus": {"reference": f"ServiceRequest/{request.json()['id']}"}, "for": {"reference": patient},
            "requester": {"reference": TOWNSHIP}, "owner": {"reference": owner},
        }
        if deadline:
            task["restriction"] = {"period": {"end": deadline}}
        created = server.call(TOWNSHIP, "POST", "Task", task, client=client)
        assert created.status_code == 201, created.text
        return str(created.json()["id"])


def accept(server: Server, task_id: str) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        current = server.call(COUNTY, "GET", f"Task/{task_id}", client=client)
        assert current.status_code == 200, current.text
        patch = [{"op": "replace", "path": "/status", "value": "accepted"}]
        response = server.call(COUNTY, "PATCH", f"Task/{task_id}", patch, client=client,
                               **{"If-Match": current.headers["etag"], "Content-Type": "application/json-patch+json"})
        assert response.status_code == 200, response.text


def subscribe(server: Server, receiver: Receiver) -> str:
    body = {
        "resourceType": "Subscription", "status": "requested", "reason": "多进程测试",
        "criteria": f"{BASE}/SubscriptionTopic/referral-status",
        "_criteria": {"extension": [{"url": f"{BACKPORT}/backport-filter-criteria",
                                     "valueString": f"Task?owner={COUNTY}"}]},
        "channel": {
            "type": "rest-hook", "endpoint": receiver.url, "payload": FHIR_JSON,
            "header": ["Authorization: Bearer receiver-token"],
            "_payload": {"extension": [{"url": f"{BACKPORT}/backport-payload-content", "valueCode": "id-only"}]},
            "extension": [{"url": f"{BACKPORT}/backport-max-count", "valuePositiveInt": 20}],
        },
    }
    created = server.call(COUNTY, "POST", "Subscription", body)
    assert created.status_code == 201, created.text
    wait_until("the handshake", lambda: receiver.statuses("handshake"))
    return str(created.json()["id"])


# --- the tests -----------------------------------------------------------------------------------


def test_concurrent_writes_reach_both_workers_and_each_event_is_notified_once(server: Server) -> None:
    n = 16
    receiver = Receiver()
    try:
        subscription_id = subscribe(server, receiver)
        before = per_worker(server, method="POST", status="201")
        with ThreadPoolExecutor(max_workers=8) as pool:
            tasks = list(pool.map(lambda _: refer(server, COUNTY), range(n)))
        after = per_worker(server, method="POST", status="201")
        served = {worker: after[worker] - before[worker] for worker in after}
        assert sum(served.values()) == 2 * n, served
        assert all(count > 0 for count in served.values()), f"a worker served no write: {served}"

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda task_id: accept(server, task_id), tasks))
        wait_until(f"{n} events at the receiver", lambda: len({number for number, _ in receiver.events()}) >= n)
        time.sleep(1.5)  # time for a duplicate (a second dispatcher, a second delivery) to show up

        events = receiver.events()
        assert sorted(number for number, _ in events) == list(range(1, n + 1)), f"repeats or gaps: {events}"
        assert sorted(focus for _, focus in events) == sorted(f"Task/{task_id}" for task_id in tasks)
        status = server.call(COUNTY, "GET", f"Subscription/{subscription_id}/$status").json()
        assert status["entry"][0]["resource"]["eventsSinceSubscriptionStart"] == str(n)
    finally:
        receiver.stop()


def test_an_overdue_referral_is_escalated_once_although_both_workers_sweep(server: Server) -> None:
    due = (datetime.now(UTC) + timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    tasks = [refer(server, STROKE, deadline=due) for _ in range(3)]

    def escalated() -> bool:
        return all(_escalation_level(server.call(STROKE, "GET", f"Task/{t}").json()) == 1 for t in tasks)

    wait_until("the escalations", escalated)
    time.sleep(3.0)  # three more sweeps in each worker
    for task_id in tasks:
        history = server.call(STROKE, "GET", f"Task/{task_id}/_history").json()
        versions = sorted(int(e["resource"]["meta"]["versionId"]) for e in history["entry"])
        assert versions == [1, 2], f"Task/{task_id}: versions {versions}; one creation and one escalation expected"


def _escalation_level(task: dict[str, Any]) -> int:
    for extension in task.get("extension") or []:
        if extension.get("url") == ESCALATION:
            return next(e["valueInteger"] for e in extension["extension"] if e["url"] == "level")
    return 0


def test_a_client_assertion_used_on_one_worker_is_refused_on_the_other(server: Server) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "mw-1", "alg": "RS384", "use": "sig"}
    client = asyncio.run(_register(server.platform_url, TOWNSHIP, "township", jwks={"keys": [public]}))
    token_url = f"{server.url}/auth/token"
    for first, second in ((1, 2), (2, 1)):
        now = int(time.time())
        assertion = jwt.encode(
            {"iss": client["client_id"], "sub": client["client_id"], "aud": token_url, "exp": now + 120,
             "jti": uuid.uuid4().hex}, key, algorithm="RS384", headers={"kid": "mw-1", "typ": "JWT"})
        form = {"grant_type": "client_credentials", "scope": "system/Patient.rs",
                "client_assertion_type": ASSERTION_TYPE, "client_assertion": assertion}
        connections = connections_to_each_worker(server)
        try:
            used = connections[first].post("/auth/token", data=form)
            replayed = connections[second].post("/auth/token", data=form)
            # Still the same two workers: the connections were kept alive throughout.
            assert [worker_of(server, connections[w])[0] for w in (first, second)] == [first, second]
        finally:
            for connection in connections.values():
                connection.close()
        assert used.status_code == 200, used.text
        assert replayed.status_code in (400, 401), replayed.text
        assert replayed.json()["error"] == "invalid_client"
        assert "already used" in replayed.json()["error_description"]


def test_the_audit_trail_of_both_workers_is_one_unbroken_chain(server: Server) -> None:
    writes = 24
    before = per_worker(server, method="POST", status="201")

    def write(index: int) -> int:
        body = {"resourceType": "Patient", "name": [{"family": f"审计{index}"}]}
        return server.call(TOWNSHIP, "POST", "Patient", body).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(write, range(writes)))
    assert statuses == [201] * writes
    after = per_worker(server, method="POST", status="201")
    served = {worker: after[worker] - before[worker] for worker in after}
    assert sum(served.values()) == writes and all(served.values()), f"a worker wrote no AuditEvent: {served}"

    output = live.run_cli(server.env, "audit", "verify")
    checked = re.search(r"ok: (\d+) AuditEvents, chain intact", output)
    assert checked is not None and int(checked.group(1)) >= writes, output


def test_connections_opened_while_a_worker_is_busy_still_reach_it(server: Server) -> None:
    """Each worker accepts on its own socket (gateway.workers), and the kernel hashes each new
    connection to one of them. With one shared socket, whichever worker called accept first took
    them all: a worker busy at that moment got none of a burst, and keep-alive connections never
    move (wrk's 16 landed 15 and 1, and one core queued fifteen clients). Here one worker is
    stopped (SIGSTOP) while 32 connections open: it still gets its share once it runs again
    (fewer than 6 of 32 happens once in 9,000)."""
    for client in connections_to_each_worker(server).values():  # every worker tagged
        client.close()
    host, port = server.url.removeprefix("http://").split(":")
    busy = _workers(server)[0]
    os.kill(busy, signal.SIGSTOP)
    try:
        burst = [socket.create_connection((host, int(port)), timeout=30) for _ in range(32)]
        time.sleep(0.5)  # a shared socket's other worker has accepted every one of them by now
    finally:
        os.kill(busy, signal.SIGCONT)
    try:
        per_worker_count: dict[int, int] = {}
        for sock in burst:
            sock.sendall(f"GET /metrics HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            tag = _count(_http_body(sock).decode(), method="OPTIONS")
            per_worker_count[tag] = per_worker_count.get(tag, 0) + 1
        assert len(per_worker_count) == WORKERS and min(per_worker_count.values()) >= 6, per_worker_count
    finally:
        for sock in burst:
            sock.close()


def test_a_worker_holding_more_than_its_share_of_connections_closes_the_surplus(server: Server) -> None:
    """The kernel hashes new connections over the workers' sockets, so a few keep-alive clients
    split unevenly (wrk's 16: 11 and 5 as often as 8 and 8). A worker holding more than half of
    the connections answers the surplus with `Connection: close`; their clients reconnect and are
    hashed anew, until neither holds more than 16 of 32. (Without the balancing, 32 connections
    split at most 16:16 about one time in seven.)"""
    for client in connections_to_each_worker(server).values():  # every worker tagged
        client.close()
    host, port = server.url.removeprefix("http://").split(":")

    def connect() -> socket.socket:
        return socket.create_connection((host, int(port)), timeout=30)

    def ask(sock: socket.socket) -> tuple[int, bool]:
        """The worker's tag, and whether it closes the connection after this answer."""
        sock.sendall(f"GET /metrics HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        head, body = _http_response(sock)
        return _count(body.decode(), method="OPTIONS"), b"connection: close" in head.lower()

    held = [connect() for _ in range(32)]
    closed = 0
    try:
        for _ in range(40):
            time.sleep(0.25)  # each worker records its connections every 0.1 s
            per_worker_count: dict[int, int] = {}
            for index, sock in enumerate(held):
                tag, closing = ask(sock)
                if closing:
                    closed += 1
                    sock.close()
                    held[index] = connect()
                else:
                    per_worker_count[tag] = per_worker_count.get(tag, 0) + 1
            if sum(per_worker_count.values()) == len(held):  # a round without a close: settled
                break
        assert sorted(per_worker_count.values()) == [16, 16], (per_worker_count, closed)
    finally:
        for sock in held:
            sock.close()


def test_sigterm_stops_every_worker_and_the_parent_exits_cleanly(server: Server) -> None:
    """A second `serve --workers 2` on the same databases, stopped as an operator (or systemd,
    or docker) stops it: the parent asks its workers to finish, waits, and exits 0, leaving
    no process behind."""
    port = live.free_port()
    with live.server_process(server.env, port, "--workers", str(WORKERS), timeout=90) as (url, process):
        parent = Server(url, server.env, server.platform_url, process.pid, server.postgres)
        workers = wait_until("both workers started", lambda: _workers(parent) if len(_workers(parent)) >= WORKERS
                             else None, timeout=60)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=40) == 0
        assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "a worker outlived its parent"


def test_workers_stop_when_their_parent_is_killed(server: Server) -> None:
    """SIGKILL leaves no chance to stop the workers: the kernel sends them SIGTERM instead
    (PR_SET_PDEATHSIG), so that no orphan goes on serving the port."""
    port = live.free_port()
    with live.server_process(server.env, port, "--workers", str(WORKERS), timeout=90) as (url, process):
        parent = Server(url, server.env, server.platform_url, process.pid, server.postgres)
        workers = wait_until("both workers started", lambda: _workers(parent) if len(_workers(parent)) >= WORKERS
                             else None, timeout=60)
        process.kill()
        process.wait()
        wait_until("the orphaned workers gone", lambda: not [p for p in workers if _alive(p)], timeout=40)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_second_server_on_the_same_port_refuses_to_start(server: Server) -> None:
    """Workers share their port with each other only: another `serve` on it must fail, not
    quietly take half of the connections."""
    port = server.url.rsplit(":", 1)[1]
    result = subprocess.run([live.ALLIANCE, "serve", "--port", port, "--workers", str(WORKERS)], env=server.env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def _http_body(sock: socket.socket) -> bytes:
    """The body of one HTTP/1.1 response with a Content-Length, read off a raw socket."""
    return _http_response(sock)[1]


def _http_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """The head and body of one HTTP/1.1 response with a Content-Length, read off a raw socket."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += sock.recv(65536)
    return head, body


def test_a_worker_killed_while_leading_loses_no_event(server: Server) -> None:
    """Last in this module: the killed worker is replaced, and the new one is not tagged."""
    receiver = Receiver()
    try:
        subscribe(server, receiver)
        time.sleep(1.0)  # the handshake's delivery lease released: the kill must not catch it held
        victim = _leading_worker(server)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        # A connection the kernel hashed to the victim's socket before its process was torn down
        # is reset with it (SO_REUSEPORT: each worker has its own queue); the test's requests
        # are about the events, so they start once that socket is gone.
        wait_until("the killed worker's sockets closed", lambda: _exited(victim), timeout=10)
        tasks = [refer(server, COUNTY) for _ in range(3)]
        for task_id in tasks:
            accept(server, task_id)
        # The survivor takes over at once (the holder's process is gone), well before the term.
        wait_until("the events after the kill", lambda: len(receiver.events()) >= len(tasks),
                   timeout=max(1.0, 12.0 - (time.monotonic() - killed_at)))
        time.sleep(1.0)  # time for a duplicate to show up
        events = receiver.events()
        assert sorted(number for number, _ in events) == [1, 2, 3], events
        assert sorted(focus for _, focus in events) == sorted(f"Task/{t}" for t in tasks)
        # The parent starts another worker in the killed one's place.
        wait_until("a worker in place of the killed one",
                   lambda: victim not in _workers(server) and len(_workers(server)) >= WORKERS, timeout=30)
    finally:
        receiver.stop()


def _workers(server: Server) -> list[int]:
    children = []
    for process in Path("/proc").glob("[0-9]*"):
        fields = _stat(process)
        if fields and int(fields[1]) == server.pid and b"resource_tracker" not in _cmdline(process):
            children.append(int(process.name))
    return children


def _exited(pid: int) -> bool:
    """The process is gone or a zombie: either way its files, sockets included, are closed."""
    fields = _stat(Path(f"/proc/{pid}"))
    return fields is None or fields[0] in ("Z", "X")


def _stat(process: Path) -> list[str] | None:
    """The fields of `/proc/<pid>/stat` after the command name (state, parent pid, …); None
    once the process is gone."""
    try:
        return (process / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _cmdline(process: Path) -> bytes:
    try:
        return (process / "cmdline").read_bytes()
    except OSError:
        return b""


def _leading_worker(server: Server) -> int:
    """The worker leading the referral outbox on SQLite (its lease names it); on PostgreSQL the
    advisory lock names no process, so any worker."""
    workers = _workers(server)
    assert len(workers) >= WORKERS, workers
    if server.postgres:
        return workers[0]
    import sqlite3

    with sqlite3.connect(Path(server.env["ALLIANCE_DATA_DIR"]) / "referral.db") as conn:
        (holder,) = conn.execute("SELECT holder FROM servicekit_lease WHERE name LIKE '%:referral'").fetchone()
    pid = int(holder.rsplit(":", 2)[1])
    assert pid in workers, (holder, workers)
    return pid


# --- the SQLite lease in isolation: two dispatchers in one process stand for two workers ---------


async def test_one_dispatcher_leads_per_sqlite_database_and_another_takes_over(tmp_path: Path) -> None:
    from servicekit.events import Consumer, InProcessBus, OutboxDispatcher, ServiceEvents
    from servicekit.events.testing import (
        FAST_RETRY,
        DatabaseTemplates,
        Recorder,
        effects,
        fast_options,
        running,
        store_for,
        wait_for,
        write_patients,
    )

    url = DatabaseTemplates(tmp_path).sqlite()
    async with running(url) as consumer_db, running(url) as first_db, running(url) as second_db:
        bus = InProcessBus()
        recorder = Recorder("lease-test")
        await bus.subscribe("consumer", Consumer("lease-test", "referral.>", recorder, consumer_db, FAST_RETRY))
        await bus.start("consumer")
        options = fast_options(poll_interval=0.1).dispatcher
        first = OutboxDispatcher("referral", first_db, bus, options)
        second = OutboxDispatcher("referral", second_db, bus, options)
        first.start()
        second.start()
        store = store_for(ServiceEvents("referral", consumer_db, InProcessBus()))

        async def handled(expected: int) -> bool:
            rows = await effects(consumer_db, "lease-test")
            assert len(rows) == len({row["event_id"] for row in rows}), "an event was handled twice"
            return len(rows) == expected

        try:
            await wait_for(lambda: first.is_leader or second.is_leader)
            await asyncio.sleep(0.3)
            assert first.is_leader != second.is_leader
            leader, standby = (first, second) if first.is_leader else (second, first)
            await write_patients(consumer_db, store, 30)
            await wait_for(lambda: handled(30))

            await leader.stop()  # a clean stop releases the lease
            await wait_for(lambda: standby.is_leader, timeout=5)
            await write_patients(consumer_db, store, 30, prefix="after")
            await wait_for(lambda: handled(60))
        finally:
            await first.stop()
            await second.stop()
            await bus.stop("consumer")


async def test_a_lease_whose_holder_died_is_taken_at_once(tmp_path: Path) -> None:
    from servicekit.events.envelope import now_micros
    from servicekit.events.lease import HOST, Lease, lease
    from servicekit.events.testing import DatabaseTemplates, running

    dead = subprocess.Popen(["true"])
    dead.wait()
    async with running(DatabaseTemplates(tmp_path).sqlite()) as database:
        async with database.transaction(write=True) as conn:
            far = now_micros() + 3600 * 1_000_000
            await conn.execute(lease.insert().values(name="job", holder=f"{HOST}:{dead.pid}:x", expires_at=far))
        ours = Lease(database, "job", ttl_seconds=15)
        assert await ours.acquire(), "a crashed worker's lease must not wait for its term"
        alive = Lease(database, "job", ttl_seconds=15)  # another holder, alive (this process)
        assert not await alive.acquire()
        await ours.release()
        assert await alive.acquire()


def test_a_worker_sheds_only_what_it_holds_beyond_its_share() -> None:
    from gateway.workers import ConnectionBalance

    counts = [0, 5, 0]  # three workers' connections
    busy, calm = ConnectionBalance(counts, 0), ConnectionBalance(counts, 2)
    busy.update(12)  # 17 in all: a share is 6
    calm.update(0)
    assert counts == [12, 5, 0]
    assert [busy.take() for _ in range(7)] == [True] * 6 + [False]
    assert calm.take() is False
    calm.update(5)
    busy.update(6)  # 6, 5, 5: a share is 6
    assert busy.take() is False

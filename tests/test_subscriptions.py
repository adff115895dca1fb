"""Topic-based subscriptions end to end: the whole system, a real HTTP receiver on 127.0.0.1 and
short retry/heartbeat intervals. Nothing of ours is mocked: referrals are created through the
gateway, events travel the outbox and the bus, and the gateway delivers over TCP."""

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import pytest_asyncio

from gateway.subscriptions.endpoints import AllowList, delivery_client
from gateway.subscriptions.notifications import SIGNATURE_HEADER, verify
from tests.support import Api, outcome_code, postgres_databases, system_settings

BASE = "http://county-alliance.org/fhir"
TOPIC = f"{BASE}/SubscriptionTopic"
BACKPORT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition"
SECRET_URL = f"{BASE}/StructureDefinition/subscription-signing-secret"
LEVEL = f"{BASE}/CodeSystem/facility-level"
CATEGORY = f"{BASE}/CodeSystem/referral-category"
TASK_CODE = f"{BASE}/CodeSystem/task-code"
SECRET = "s3cret-for-the-test-receiver-0123456789"
RETRY_WINDOW_SECONDS = 6.0


# --- a real receiver -------------------------------------------------------------------------


@dataclass
class Receiver:
    """A minimal HTTP/1.1 server on 127.0.0.1 that records every POST; it can go down (closing
    its port and open connections) and come back on the same port."""

    port: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    raw: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    server: asyncio.base_events.Server | None = None
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", self.port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.close()
        await self.server.wait_closed()
        self.server = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.raw.append((headers, body))
                self.bodies.append(orjson.loads(body))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    def notifications(self, kind: str = "event-notification") -> list[dict[str, Any]]:
        return [b for b in self.bodies if status_of(b)["type"] == kind]

    def event_numbers(self) -> list[int]:
        return [int(e["eventNumber"]) for b in self.notifications() for e in status_of(b).get("notificationEvent", [])]

    def focuses(self) -> list[str]:
        return [e["focus"]["reference"].split("/fhir/")[-1]
                for b in self.notifications() for e in status_of(b).get("notificationEvent", [])]


def status_of(bundle: dict[str, Any]) -> dict[str, Any]:
    first = bundle["entry"][0]["resource"]
    assert first["resourceType"] == "SubscriptionStatus", first
    return first


async def wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


# --- the system under test -------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def api(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Api]:
    from gateway.app import create_gateway_app, service_definitions
    from servicekit.migrations import upgrade

    data_dir: Path = tmp_path_factory.mktemp("subscriptions")
    postgres = os.environ.get("ALLIANCE_TEST_POSTGRES_URL")
    urls_context = postgres_databases(postgres, f"s{uuid.uuid4().hex[:8]}") if postgres else None
    urls = urls_context.__enter__() if urls_context else None
    try:
        settings = system_settings(
            data_dir, urls,
            events_poll_interval_seconds=0.1,
            subscription_poll_interval_seconds=0.1,
            subscription_retry_backoff_seconds=0.2,
            subscription_retry_backoff_max_seconds=0.5,
            subscription_retry_window_hours=RETRY_WINDOW_SECONDS / 3600,
            subscription_heartbeat_min_seconds=1,
            subscription_timeout_seconds=2,
        )
        for name, definition in service_definitions().items():
            upgrade(settings.database_url(name), definition.all_lineages)
        app = create_gateway_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080") as client:
                yield Api(app, client)
    finally:
        if urls_context:
            urls_context.__exit__(None, None, None)


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    await receiver.start()
    yield receiver
    if receiver.server is not None:
        await receiver.stop()


@dataclass
class Alliance:
    county: str
    other_county: str
    township: str
    patient: str


async def _organization(api: Api, level: str, parent: str | None) -> str:
    org_id = f"{level.split('-')[0]}-{uuid.uuid4().hex[:8]}"
    body: dict[str, Any] = {"resourceType": "Organization", "id": org_id, "name": org_id,
                            "type": [{"coding": [{"system": LEVEL, "code": level}]}]}
    if parent:
        body["partOf"] = {"reference": parent}
    assert (await api.put(f"Organization/{org_id}", body)).status_code == 201
    return f"Organization/{org_id}"


@pytest_asyncio.fixture(scope="module")
async def alliance(api: Api) -> Alliance:
    city = await _organization(api, "city-hospital", None)
    county = await _organization(api, "county-hospital", city)
    other = await _organization(api, "stroke-center", county)  # another receiver in the same alliance
    township = await _organization(api, "township-health-center", county)
    patient = await api.post("Patient", {"resourceType": "Patient", "name": [{"family": "陈", "given": ["桂英"]}]})
    return Alliance(county, other, township, f"Patient/{patient.json()['id']}")


async def refer(api: Api, alliance: Alliance, sender: str, receiver: str) -> str:
    """Submit a referral (ServiceRequest + Task) as `sender`; returns the Task's id."""
    request = await api.post("ServiceRequest", {
        "resourceType": "ServiceRequest", "status": "active", "intent": "order", "priority": "urgent",
        "category": [{"coding": [{"system": CATEGORY, "code": "upward-referral"}]}],
        "subject": {"reference": alliance.patient}, "requester": {"reference": sender},
        "performer": [{"reference": receiver}], "reasonCode": [{"text": "反复胸闷一周"}],
    }, organization=sender, level="township")
    assert request.status_code == 201, request.text
    task = await api.post("Task", {
        "resourceType": "Task", "status": "requested", "intent": "order", "priority": "urgent",
        "code": {"coding": [{"system": TASK_CODE, "code": "referral"}]},
        "focus": {"reference": f"ServiceRequest/{request.json()['id']}"}, "for": {"reference": alliance.patient},
        "requester": {"reference": sender}, "owner": {"reference": receiver},
    }, organization=sender, level="township")
    assert task.status_code == 201, task.text
    return str(task.json()["id"])


def subscription(endpoint: str, *, topic: str = "referral-request", filters: tuple[str, ...] = (),
                 content: str = "full-resource", heartbeat: int | None = None, secret: str | None = SECRET,
                 headers: tuple[str, ...] = ()) -> dict[str, Any]:
    channel: dict[str, Any] = {
        "type": "rest-hook", "endpoint": endpoint, "payload": "application/fhir+json",
        "_payload": {"extension": [{"url": f"{BACKPORT}/backport-payload-content", "valueCode": content}]},
        "extension": [{"url": f"{BACKPORT}/backport-max-count", "valuePositiveInt": 5}],
    }
    if heartbeat:
        channel["extension"].append({"url": f"{BACKPORT}/backport-heartbeat-period", "valueUnsignedInt": heartbeat})
    if secret:
        channel["extension"].append({"url": SECRET_URL, "valueString": secret})
    if headers:
        channel["header"] = list(headers)
    body: dict[str, Any] = {
        "resourceType": "Subscription", "status": "requested", "reason": "转诊通知",
        "criteria": f"{TOPIC}/{topic}", "channel": channel,
    }
    if filters:
        body["_criteria"] = {"extension": [{"url": f"{BACKPORT}/backport-filter-criteria", "valueString": f}
                                           for f in filters]}
    return body


async def subscribe(api: Api, organization: str, body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    response = await api.post("Subscription", body, organization=organization, **kwargs)
    assert response.status_code == 201, response.text
    return response.json()


async def status_resource(api: Api, organization: str, subscription_id: str) -> dict[str, Any]:
    response = await api.get(f"Subscription/{subscription_id}/$status", organization=organization)
    assert response.status_code == 200, response.text
    return response.json()["entry"][0]["resource"]


async def subscribed(api: Api, receiver: Receiver, organization: str, **options: Any) -> str:
    """Create a subscription and wait for its handshake; returns its id."""
    created = await subscribe(api, organization, subscription(receiver.url, **options))
    await wait_for(lambda: receiver.notifications("handshake"))
    await wait_for(lambda: _is_active(api, organization, created["id"]))
    return str(created["id"])


async def _is_active(api: Api, organization: str, subscription_id: str) -> bool:
    return (await api.get(f"Subscription/{subscription_id}", organization=organization)).json()["status"] == "active"


# --- topics and validation -------------------------------------------------------------------


class TestTopics:
    async def test_the_seven_topics_are_served_with_their_filters(self, api: Api) -> None:
        found = await api.get("SubscriptionTopic", params={"_count": "50"})
        assert found.status_code == 200, found.text
        topics = {e["resource"]["url"]: e["resource"] for e in found.json()["entry"]}
        assert set(topics) == {f"{TOPIC}/{code}" for code in (
            "referral-request", "referral-status", "green-channel-alert", "teleconsult-request",
            "teleconsult-status", "result-available", "recall")}
        referral = topics[f"{TOPIC}/referral-request"]
        assert referral["resourceTrigger"][0]["resource"] == "Task"
        assert {f["filterParameter"] for f in referral["canFilterBy"]} >= {"owner", "requester", "patient"}
        results = topics[f"{TOPIC}/result-available"]
        assert {t["resource"] for t in results["resourceTrigger"]} == {"DiagnosticReport", "Observation"}

    async def test_clients_cannot_write_topics(self, api: Api) -> None:
        response = await api.put("SubscriptionTopic/referral-request", {
            "resourceType": "SubscriptionTopic", "id": "referral-request", "url": f"{TOPIC}/referral-request",
            "status": "retired"})
        assert response.status_code == 403
        assert outcome_code(response) == "forbidden"


class TestValidation:
    @pytest.mark.parametrize("change, expression", [
        (lambda s: s.update(criteria=f"{TOPIC}/no-such-topic"), "Subscription.criteria"),
        (lambda s: s.update(_criteria={"extension": [
            {"url": f"{BACKPORT}/backport-filter-criteria", "valueString": "Task?colour=red"}]}),
         "Subscription.criteria.extension"),
        (lambda s: s.update(_criteria={"extension": [
            {"url": f"{BACKPORT}/backport-filter-criteria", "valueString": "Observation?patient=Patient/1"}]}),
         "Subscription.criteria.extension"),
        (lambda s: s["channel"].update(type="email"), "Subscription.channel.type"),
        (lambda s: s["channel"].update(endpoint="http://192.0.2.10/hook"), "Subscription.channel.endpoint"),
        (lambda s: s["channel"].update(endpoint="http://[::ffff:10.0.0.1]/hook"), "Subscription.channel.endpoint"),
        (lambda s: s["channel"].update(endpoint="file:///etc/passwd"), "Subscription.channel.endpoint"),
        (lambda s: s["channel"]["_payload"]["extension"][0].update(valueCode="everything"),
         "Subscription.channel.payload"),
        (lambda s: s["channel"].update(header=["Host: evil.example"]), "Subscription.channel.header[0]"),
    ])
    async def test_refused_with_422_naming_the_element(self, api: Api, change: Any, expression: str) -> None:
        body = subscription("http://127.0.0.1:9/hook")
        change(body)
        response = await api.post("Subscription", body)
        assert response.status_code == 422, response.text
        assert outcome_code(response) == "business-rule"
        assert response.json()["issue"][0]["expression"] == [expression]

    async def test_a_way_to_authenticate_notifications_is_required(self, api: Api) -> None:
        response = await api.post("Subscription", subscription("http://127.0.0.1:9/hook", secret=None))
        assert response.status_code == 422
        with_header = await api.post("Subscription", subscription(
            "http://127.0.0.1:9/hook", secret=None, headers=("Authorization: Bearer receiver-token",)))
        assert with_header.status_code == 201, with_header.text

    async def test_a_host_name_is_judged_by_the_address_it_resolves_to(self, api: Api) -> None:
        response = await api.post("Subscription", subscription("http://localhost:9/hook"))
        assert response.status_code == 201, response.text

    async def test_the_secret_is_never_stored_in_the_resource(self, api: Api) -> None:
        created = await subscribe(api, "Organization/test-org", subscription("http://127.0.0.1:9/hook"))
        read = await api.get(f"Subscription/{created['id']}")
        assert SECRET not in read.text and SECRET not in orjson.dumps(created).decode()
        assert read.json()["status"] in ("requested", "error")  # nobody listens on port 9

    async def test_scopes_must_cover_the_topic(self, api: Api) -> None:
        response = await api.post("Subscription", subscription("http://127.0.0.1:9/hook"),
                                  scope="system/Subscription.cruds system/ServiceRequest.rs")
        assert response.status_code == 422
        assert "Task" in response.json()["issue"][0]["diagnostics"]

    async def test_delivery_connects_only_to_allowed_addresses(self, receiver: Receiver) -> None:
        # The guard sits at connection time: even a URL that passed earlier reaches nothing off the list.
        client = delivery_client(AllowList(["10.0.0.0/8"]))
        try:
            with pytest.raises(httpx.ConnectError, match="outside the allowed networks"):
                await client.post(receiver.url, content=b"{}")
        finally:
            await client.aclose()
        assert receiver.bodies == []


# --- delivery --------------------------------------------------------------------------------


class TestDelivery:
    async def test_handshake_then_owner_filtered_full_resource_notification_signed(
        self, api: Api, alliance: Alliance, receiver: Receiver
    ) -> None:
        subscription_id = await subscribed(api, receiver, alliance.county, filters=(f"Task?owner={alliance.county}",))
        handshake = status_of(receiver.notifications("handshake")[0])
        assert handshake["eventsSinceSubscriptionStart"] == "0"
        assert handshake["subscription"]["reference"].endswith(f"/Subscription/{subscription_id}")

        elsewhere = await refer(api, alliance, alliance.township, alliance.other_county)
        mine = await refer(api, alliance, alliance.township, alliance.county)
        await wait_for(lambda: receiver.notifications())
        await asyncio.sleep(0.5)  # time for a wrong delivery of the other referral to show up

        assert receiver.focuses() == [f"Task/{mine}"]
        assert f"Task/{elsewhere}" not in str(receiver.bodies)
        bundle = receiver.notifications()[0]
        assert bundle["type"] == "history"
        status = status_of(bundle)
        assert status["eventsSinceSubscriptionStart"] == "1"
        assert status["topic"] == f"{TOPIC}/referral-request"
        assert bundle["entry"][1]["resource"]["id"] == mine
        assert bundle["entry"][1]["resource"]["owner"]["reference"] == alliance.county

        headers, body = next((h, b) for h, b in receiver.raw if orjson.loads(b)["id"] == bundle["id"])
        assert verify(SECRET, body, headers[SIGNATURE_HEADER.lower()])
        assert not verify("another-secret-that-is-long-enough-000", body, headers[SIGNATURE_HEADER.lower()])
        assert not verify(SECRET, body + b" ", headers[SIGNATURE_HEADER.lower()])

    async def test_channel_headers_are_sent(self, api: Api, alliance: Alliance, receiver: Receiver) -> None:
        await subscribed(api, receiver, alliance.county, secret=None, headers=("Authorization: Bearer abc",))
        assert receiver.raw[0][0]["authorization"] == "Bearer abc"
        assert SIGNATURE_HEADER.lower() not in receiver.raw[0][0]

    async def test_receiver_down_error_then_resumes_in_order_and_events_replays(
        self, api: Api, alliance: Alliance, receiver: Receiver
    ) -> None:
        county = alliance.county
        subscription_id = await subscribed(api, receiver, county, filters=(f"Task?owner={county}",),
                                           content="id-only")
        first = await refer(api, alliance, alliance.township, county)
        await wait_for(lambda: receiver.event_numbers() == [1])

        await receiver.stop()
        missed = [await refer(api, alliance, alliance.township, county) for _ in range(3)]
        # Events keep being numbered while the receiver is away.
        await wait_for(lambda: _status_is(api, county, subscription_id, "error", events="4"))
        status = await status_resource(api, county, subscription_id)
        assert "ConnectError" in status["error"][0]["text"]
        resource = (await api.get(f"Subscription/{subscription_id}", organization=county)).json()
        assert resource["status"] == "error" and "ConnectError" in resource["error"]

        await receiver.start()  # same port
        await wait_for(lambda: receiver.event_numbers() == [1, 2, 3, 4])
        assert receiver.focuses() == [f"Task/{task}" for task in [first, *missed]]
        await wait_for(lambda: _is_active(api, county, subscription_id))

        replay = await api.get(f"Subscription/{subscription_id}/$events",
                               params={"eventsSinceNumber": "2", "eventsUntilNumber": "4"}, organization=county)
        assert replay.status_code == 200, replay.text
        events = status_of(replay.json())["notificationEvent"]
        assert [e["eventNumber"] for e in events] == ["2", "3", "4"]
        assert [e["focus"]["reference"].split("/fhir/")[-1] for e in events] == [f"Task/{t}" for t in missed]
        assert status_of(replay.json())["type"] == "query-event"
        status = await status_resource(api, county, subscription_id)
        assert (status["status"], status["eventsSinceSubscriptionStart"]) == ("active", "4")
        assert "error" not in status

    async def test_after_the_retry_window_it_is_off_says_so_and_resumes_when_requested(
        self, api: Api, alliance: Alliance, receiver: Receiver
    ) -> None:
        county = alliance.county
        subscription_id = await subscribed(api, receiver, county, filters=(f"Task?owner={county}",))
        await receiver.stop()
        task = await refer(api, alliance, alliance.township, county)
        await wait_for(lambda: _status_is(api, county, subscription_id, "off"), timeout=RETRY_WINDOW_SECONDS + 15)
        status = await status_resource(api, county, subscription_id)
        assert "$events" in status["error"][0]["text"]
        kept = await api.get(f"Subscription/{subscription_id}/$events", organization=county)
        assert [e["focus"]["reference"].split("/fhir/")[-1]
                for e in status_of(kept.json())["notificationEvent"]] == [f"Task/{task}"]
        assert kept.json()["entry"][1]["resource"]["id"] == task  # full-resource kept for replay

        await receiver.start()
        resource = (await api.get(f"Subscription/{subscription_id}", organization=county)).json()
        resumed = await api.put(f"Subscription/{subscription_id}", {**resource, "status": "requested"},
                                organization=county)
        assert resumed.status_code == 200, resumed.text
        await wait_for(lambda: receiver.event_numbers() == [1])
        assert receiver.focuses() == [f"Task/{task}"]

    async def test_heartbeat(self, api: Api, alliance: Alliance, receiver: Receiver) -> None:
        await subscribed(api, receiver, alliance.county, filters=(f"Task?owner={alliance.county}",), heartbeat=1)
        await wait_for(lambda: len(receiver.notifications("heartbeat")) >= 2, timeout=10)
        beat = status_of(receiver.notifications("heartbeat")[0])
        assert beat["status"] == "active" and "notificationEvent" not in beat


class TestEntitlement:
    async def test_a_subscriber_gets_only_what_it_may_read(self, api: Api, alliance: Alliance,
                                                           receiver: Receiver) -> None:
        stranger = alliance.other_county
        await subscribed(api, receiver, stranger)  # no filter: every new referral, if entitled
        task = await refer(api, alliance, alliance.township, alliance.county)
        own = await refer(api, alliance, alliance.township, stranger)
        await wait_for(lambda: f"Task/{own}" in receiver.focuses())
        may_read = (await api.get(f"Task/{task}", organization=stranger)).status_code == 200
        # Whatever the referral service's access rules say, the subscription says the same.
        assert (f"Task/{task}" in receiver.focuses()) == may_read
        assert receiver.event_numbers() == list(range(1, len(receiver.event_numbers()) + 1))  # no gaps

    async def test_a_disabled_client_receives_nothing_more(self, api: Api, alliance: Alliance,
                                                           receiver: Receiver) -> None:
        from sqlalchemy import select

        from gateway.auth import set_enabled
        from gateway.auth.clients import gateway_client

        county, scope = alliance.county, "system/*.cruds system/Subscription.rs"  # a client of its own
        created = await subscribe(api, county, subscription(receiver.url, filters=(f"Task?owner={county}",)),
                                  scope=scope)
        await wait_for(lambda: _is_active(api, county, created["id"]))
        engine = api.system.state.apps["platform"].state.database.engine
        async with engine.connect() as conn:
            client_id = (await conn.execute(select(gateway_client.c.client_id).where(
                gateway_client.c.organization == county, gateway_client.c.scope == scope))).scalar_one()
        await set_enabled(engine, client_id, False)
        await refer(api, alliance, alliance.township, county)
        await asyncio.sleep(1.5)
        assert receiver.notifications() == []
        status = await status_resource(api, county, created["id"])  # the organization's other client
        assert status["eventsSinceSubscriptionStart"] == "0"

    async def test_status_and_events_of_another_organization_are_not_found(self, api: Api, alliance: Alliance,
                                                                           receiver: Receiver) -> None:
        subscription_id = await subscribed(api, receiver, alliance.county)
        for operation in ("$status", "$events"):
            response = await api.get(f"Subscription/{subscription_id}/{operation}", organization=alliance.township)
            assert response.status_code == 404, response.text
            assert outcome_code(response) == "not-found"


async def _status_is(api: Api, organization: str, subscription_id: str, wanted: str, events: str | None = None) -> bool:
    status = await status_resource(api, organization, subscription_id)
    return status["status"] == wanted and events in (None, status["eventsSinceSubscriptionStart"])


def test_the_documented_example_receiver_verifies_our_signature() -> None:
    import importlib.util

    from gateway.subscriptions.notifications import sign

    path = Path(__file__).resolve().parents[1] / "docs" / "examples" / "receiver.py"
    spec = importlib.util.spec_from_file_location("example_receiver", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    body = b'{"resourceType":"Bundle","type":"history"}'
    assert example.verify(SECRET, body, sign(SECRET, body))
    assert not example.verify(SECRET, body.replace(b"history", b"batch"), sign(SECRET, body))
    assert not example.verify(SECRET, body, sign(SECRET, body, timestamp=int(time.time()) - 3600))

"""A transaction spanning services (issue 6): a township health center submits a referral as one
transaction Bundle (ServiceRequest + Task + Condition, held by referral, with a DocumentReference,
held by results sharing). The gateway splits it, dry-runs every piece, commits in dependency order
and compensates when a later piece fails at commit time (gateway/cross_transaction.py)."""

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest

from fhirkit.api.compensation import STEP_HEADER
from servicekit.identity import IDENTITY_HEADER, CallerIdentity, sign_identity
from tests.support import create_organization, outcome_code

BASE = "http://county-alliance.org/fhir"
LEVEL = f"{BASE}/CodeSystem/facility-level"
CATEGORY = f"{BASE}/CodeSystem/referral-category"
TASK_CODE = f"{BASE}/CodeSystem/task-code"
IDENTIFIERS = "urn:test:cross-service-transaction"


@dataclass
class Parties:
    api: Any
    county: str
    township: str
    village: str
    patient: str

    async def call(self, method: str, path: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        return await self.api.request(method, path, body, organization=self.township, level="township", **kwargs)


@pytest.fixture
async def parties(api: Any) -> Parties:
    province = await create_organization(api, "provincial-hospital", None)
    city = await create_organization(api, "city-hospital", province)
    county = await create_organization(api, "county-hospital", city)
    township = await create_organization(api, "township-health-center", county)
    village = await create_organization(api, "village-clinic", township)
    patient = await api.post("Patient", {"resourceType": "Patient", "name": [{"family": "陈", "given": ["桂英"]}],
                                         "gender": "female", "birthDate": "1952-03-08"})
    assert patient.status_code == 201, patient.text
    return Parties(api, county, township, village, f"Patient/{patient.json()['id']}")


@dataclass
class Referral:
    """A referral Bundle and the identifiers that find its resources again."""

    bundle: dict[str, Any]
    key: str  # the identifier value every resource of this Bundle carries

    def entry(self, resource_type: str) -> dict[str, Any]:
        return next(e for e in self.bundle["entry"] if e["request"]["url"].startswith(resource_type))

    def index(self, resource_type: str) -> int:
        return self.bundle["entry"].index(self.entry(resource_type))


def referral_bundle(parties: Parties, *, receiver: str | None = None) -> Referral:
    """DocumentReference, Condition, ServiceRequest, Task: the request's supportingInfo and
    reasonReference and the Task's focus are `urn:uuid` references to the other entries."""
    key = uuid.uuid4().hex
    ident = [{"system": IDENTIFIERS, "value": key}]
    document_url, condition_url, request_url = (f"urn:uuid:{uuid.uuid4()}" for _ in range(3))
    receiver = receiver or parties.county
    document = {"resourceType": "DocumentReference", "status": "current", "identifier": ident,
                "type": {"text": "转诊病历摘要"}, "subject": {"reference": parties.patient},
                "content": [{"attachment": {"contentType": "text/plain", "data": "5Ye66Zmi5bCP57uT"}}]}
    condition = {"resourceType": "Condition", "identifier": ident, "subject": {"reference": parties.patient},
                 "code": {"text": "不稳定型心绞痛"}}
    request = {"resourceType": "ServiceRequest", "identifier": ident, "status": "active", "intent": "order",
               "category": [{"coding": [{"system": CATEGORY, "code": "upward-referral"}]}], "priority": "urgent",
               "subject": {"reference": parties.patient}, "requester": {"reference": parties.township},
               "performer": [{"reference": receiver}], "reasonReference": [{"reference": condition_url}],
               "supportingInfo": [{"reference": document_url}],
               "requisition": {"system": f"{BASE}/sid/referral-chain", "value": key}}
    task = {"resourceType": "Task", "identifier": ident, "status": "requested", "intent": "order",
            "priority": "urgent", "code": {"coding": [{"system": TASK_CODE, "code": "referral"}]},
            "focus": {"reference": request_url}, "for": {"reference": parties.patient},
            "requester": {"reference": parties.township}, "owner": {"reference": receiver}}
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": document_url, "resource": document, "request": {"method": "POST", "url": "DocumentReference"}},
        {"fullUrl": condition_url, "resource": condition, "request": {"method": "POST", "url": "Condition"}},
        {"fullUrl": request_url, "resource": request, "request": {"method": "POST", "url": "ServiceRequest"}},
        {"resource": task, "request": {"method": "POST", "url": "Task"}},
    ]}
    return Referral(bundle, key)


async def found(parties: Parties, resource_type: str, key: str) -> list[dict[str, Any]]:
    response = await parties.call("GET", f"{resource_type}?identifier={IDENTIFIERS}|{key}")
    assert response.status_code == 200, response.text
    return [e["resource"] for e in response.json().get("entry") or []]


async def stored_nowhere(parties: Parties, key: str) -> None:
    for resource_type in ("DocumentReference", "Condition", "ServiceRequest", "Task"):
        assert await found(parties, resource_type, key) == [], resource_type


def diagnostics(response: httpx.Response) -> str:
    return " | ".join(issue.get("diagnostics", "") for issue in response.json()["issue"])


class TestReferralWithItsDocument:
    async def test_stored_everywhere_and_linked(self, parties: Parties) -> None:
        referral = referral_bundle(parties)
        response = await parties.call("POST", "", referral.bundle)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["type"] == "transaction-response"
        entries = answer["entry"]
        assert [e["response"]["status"] for e in entries] == ["201 Created"] * 4
        # In the client's order: each answer entry is the resource of the same request entry.
        assert [e["resource"]["resourceType"] for e in entries] == [
            "DocumentReference", "Condition", "ServiceRequest", "Task"]
        document, condition, request, task = (e["resource"] for e in entries)
        assert entries[0]["response"]["location"].startswith(f"DocumentReference/{document['id']}/_history/1")

        assert request["supportingInfo"] == [{"reference": f"DocumentReference/{document['id']}"}]
        assert request["reasonReference"] == [{"reference": f"Condition/{condition['id']}"}]
        assert task["focus"] == {"reference": f"ServiceRequest/{request['id']}"}
        # Read back from each owner: the reference resolves to the stored document.
        read_document = await parties.call("GET", request["supportingInfo"][0]["reference"])
        assert read_document.status_code == 200, read_document.text
        assert read_document.json()["content"] == referral.entry("DocumentReference")["resource"]["content"]
        for resource in (condition, request, task):
            read = await parties.call("GET", f"{resource['resourceType']}/{resource['id']}")
            assert read.status_code == 200, read.text
        assert [r["id"] for r in await found(parties, "DocumentReference", referral.key)] == [document["id"]]

    async def test_references_both_ways_between_the_services(self, parties: Parties) -> None:
        # The document names the referral it belongs to, the referral the document: a cycle.
        referral = referral_bundle(parties)
        request_url = referral.entry("ServiceRequest")["fullUrl"]
        referral.entry("DocumentReference")["resource"]["context"] = {"related": [{"reference": request_url}]}
        response = await parties.call("POST", "", referral.bundle)
        assert response.status_code == 200, response.text
        document, _, request, _ = (e["resource"] for e in response.json()["entry"])
        assert document["context"]["related"] == [{"reference": f"ServiceRequest/{request['id']}"}]
        assert request["supportingInfo"] == [{"reference": f"DocumentReference/{document['id']}"}]

    async def test_the_receiver_sees_the_referral(self, parties: Parties) -> None:
        referral = referral_bundle(parties)
        response = await parties.call("POST", "", referral.bundle)
        assert response.status_code == 200, response.text
        task = response.json()["entry"][3]["resource"]
        seen = await parties.api.get(f"Task/{task['id']}", organization=parties.county, level="county")
        assert seen.status_code == 200, seen.text

    async def test_prefer_minimal_answers_without_resources(self, parties: Parties) -> None:
        referral = referral_bundle(parties)
        response = await parties.call("POST", "", referral.bundle, headers={"Prefer": "return=minimal"})
        assert response.status_code == 200, response.text
        entries = response.json()["entry"]
        assert all("resource" not in e and e["response"]["status"] == "201 Created" for e in entries)
        assert entries[0]["response"]["location"].startswith("DocumentReference/")


class TestNothingWrittenWhenAPieceIsRefused:
    async def test_a_referral_rule_refuses_the_document_too(self, parties: Parties) -> None:
        # An upward referral to a lower tier (a village clinic) breaks the routing rules.
        referral = referral_bundle(parties, receiver=parties.village)
        response = await parties.call("POST", "", referral.bundle)
        assert response.status_code == 422, response.text
        assert outcome_code(response) == "business-rule"
        # The index in the client's Bundle (2), not the one in the referral service's piece (1).
        assert f"Bundle.entry[{referral.index('ServiceRequest')}]" in diagnostics(response)
        await stored_nowhere(parties, referral.key)

    async def test_an_invalid_document_refuses_the_referral_too(self, parties: Parties) -> None:
        referral = referral_bundle(parties)
        referral.entry("DocumentReference")["resource"]["status"] = "not-a-status"
        # Moved last: its index in the client's Bundle (3) differs from its index in its piece (0).
        referral.bundle["entry"].append(referral.bundle["entry"].pop(0))
        response = await parties.call("POST", "", referral.bundle)
        assert response.status_code == 400, response.text
        assert "Bundle.entry[3]" in diagnostics(response)
        assert "Bundle.entry[0]" not in diagnostics(response)
        await stored_nowhere(parties, referral.key)

    async def test_a_missing_reference_names_its_entry(self, parties: Parties) -> None:
        referral = referral_bundle(parties)
        referral.entry("Condition")["resource"]["encounter"] = {"reference": f"Encounter/{uuid.uuid4()}"}
        response = await parties.call("POST", "", referral.bundle)
        assert response.status_code == 422, response.text
        assert f"Bundle.entry[{referral.index('Condition')}]" in diagnostics(response)
        await stored_nowhere(parties, referral.key)

    async def test_a_conditional_create_another_service_refers_to_is_refused(self, parties: Parties) -> None:
        referral = referral_bundle(parties)
        referral.entry("DocumentReference")["request"]["ifNoneExist"] = f"identifier={IDENTIFIERS}|{referral.key}"
        response = await parties.call("POST", "", referral.bundle)
        assert response.status_code == 422, response.text
        assert "conditional" in diagnostics(response) and "Bundle.entry[0]" in diagnostics(response)
        await stored_nowhere(parties, referral.key)

    async def test_a_conditional_create_nobody_else_refers_to_works(self, parties: Parties) -> None:
        referral = referral_bundle(parties)
        criteria = f"identifier={IDENTIFIERS}|{referral.key}"
        referral.entry("Condition")["request"]["ifNoneExist"] = criteria
        referral.entry("ServiceRequest")["resource"]["reasonCode"] = [{"text": "胸闷"}]
        del referral.entry("ServiceRequest")["resource"]["reasonReference"]
        response = await parties.call("POST", "", referral.bundle)
        assert response.status_code == 200, response.text
        assert len(await found(parties, "Condition", referral.key)) == 1

    async def test_a_conditional_reference_to_another_service_is_refused(self, parties: Parties) -> None:
        referral = referral_bundle(parties)
        referral.entry("ServiceRequest")["resource"]["supportingInfo"] = [
            {"reference": f"DocumentReference?identifier={IDENTIFIERS}|{referral.key}"}]
        response = await parties.call("POST", "", referral.bundle)
        assert response.status_code == 422, response.text
        assert "conditional reference" in diagnostics(response)
        await stored_nowhere(parties, referral.key)


class TestTheDryRunSignal:
    async def test_a_client_sending_the_header_gets_a_real_commit(self, parties: Parties) -> None:
        referral = referral_bundle(parties)
        response = await parties.call("POST", "", referral.bundle, headers={STEP_HEADER: "dry-run"})
        assert response.status_code == 200, response.text
        assert len(await found(parties, "DocumentReference", referral.key)) == 1
        assert len(await found(parties, "ServiceRequest", referral.key)) == 1

    async def test_ignored_on_a_transaction_within_one_service(self, parties: Parties) -> None:
        referral = referral_bundle(parties)
        referral.bundle["entry"] = [referral.entry("Condition")]
        response = await parties.call("POST", "", referral.bundle, headers={STEP_HEADER: "dry-run"})
        assert response.status_code == 200, response.text
        assert len(await found(parties, "Condition", referral.key)) == 1

    async def test_a_service_refuses_the_header_from_anyone_but_the_gateway_coordinating(
        self, system: Any, parties: Parties
    ) -> None:
        referral = referral_bundle(parties)
        piece = {"bundle": {**referral.bundle, "entry": [referral.entry("Condition")]}, "entryIndexes": [1]}
        secret = system.state.settings.secret("internal_secret")
        # What the gateway signs for an ordinary request of this client: no coordinator role.
        client_identity = CallerIdentity("a-client", parties.township, ("system/*.cruds",), "township")
        app = system.state.apps["referral"]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://referral") as service:
            for step in ("dry-run", "commit", "compensate"):
                anonymous = await service.post("/fhir", json=piece, headers={STEP_HEADER: step})
                assert anonymous.status_code == 401, anonymous.text
                signed = {IDENTITY_HEADER: sign_identity(client_identity, secret), STEP_HEADER: step}
                refused = await service.post("/fhir", json=piece, headers=signed)
                assert refused.status_code == 403, refused.text
                assert outcome_code(refused) == "forbidden"
        assert await found(parties, "Condition", referral.key) == []


@asynccontextmanager
async def before_commit(system: Any, service: str, action: Callable[[dict[str, Any]], Awaitable[None]]
                        ) -> AsyncIterator[None]:
    """Runs `action` (with the piece's body) when the gateway commits its piece of a transaction
    at `service`, just before the service sees it: another client's write landing between the
    dry run and the commit, at a deterministic moment. Nothing of ours is replaced: the service
    app is wrapped, and answers as always."""
    gateway = system.state.gateway
    inner = gateway.local_apps[service]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
        if headers.get(STEP_HEADER.lower()) == "commit":
            message = await receive()
            await action(orjson.loads(message.get("body", b"")))

            async def replay() -> dict[str, Any]:
                return message

            await inner(scope, replay, send)
            return
        await inner(scope, receive, send)

    gateway.local_apps[service] = app
    try:
        yield
    finally:
        gateway.local_apps[service] = inner


class TestCompensation:
    async def _conflicting_referral(self, parties: Parties) -> tuple[Referral, dict[str, Any]]:
        """The referral with an update of an existing Condition, expected at version 1."""
        existing = await parties.call("POST", "Condition", {
            "resourceType": "Condition", "subject": {"reference": parties.patient}, "code": {"text": "高血压"}})
        assert existing.status_code == 201, existing.text
        condition = existing.json()
        referral = referral_bundle(parties)
        changed = {**condition, "note": [{"text": "转诊时复核"}]}
        referral.bundle["entry"].append({"resource": changed, "request": {
            "method": "PUT", "url": f"Condition/{condition['id']}", "ifMatch": 'W/"1"'}})
        return referral, condition

    async def test_a_later_piece_failing_at_commit_removes_the_earlier_pieces_creates(
        self, system: Any, parties: Parties
    ) -> None:
        referral, condition = await self._conflicting_referral(parties)

        async def someone_else_updates_the_condition(piece: dict[str, Any]) -> None:
            update = await parties.call("PUT", f"Condition/{condition['id']}",
                                        {**condition, "note": [{"text": "另一位医生的修改"}]})
            assert update.status_code == 200, update.text

        async with before_commit(system, "referral", someone_else_updates_the_condition):
            response = await parties.call("POST", "", referral.bundle)
        assert response.status_code == 412, response.text
        text = diagnostics(response)
        assert "Bundle.entry[4]" in text and "removed again" in text
        # Nothing of the referral is left: the document was created, then removed again.
        await stored_nowhere(parties, referral.key)
        removed = [i for i in response.json()["issue"] if "removed again" in i["diagnostics"]]
        assert len(removed) == 1 and removed[0]["severity"] == "information"
        # Said of the client's entry that created it.
        entry, document = removed[0]["diagnostics"].split(" ")[:2]
        assert entry == f"Bundle.entry[{referral.index('DocumentReference')}]:"
        assert (await parties.call("GET", document)).status_code == 410

    async def test_a_created_resource_changed_meanwhile_is_left_and_reported(
        self, system: Any, parties: Parties
    ) -> None:
        referral, condition = await self._conflicting_referral(parties)
        documents: list[str] = []

        async def someone_else_changes_both(piece: dict[str, Any]) -> None:
            request = next(e["resource"] for e in piece["bundle"]["entry"]
                           if e["resource"]["resourceType"] == "ServiceRequest")
            documents.append(request["supportingInfo"][0]["reference"])
            document = (await parties.call("GET", documents[0])).json()
            changed = await parties.call("PUT", documents[0], {**document, "description": "补充说明"})
            assert changed.status_code == 200, changed.text
            update = await parties.call("PUT", f"Condition/{condition['id']}",
                                        {**condition, "note": [{"text": "另一位医生的修改"}]})
            assert update.status_code == 200, update.text

        async with before_commit(system, "referral", someone_else_changes_both):
            response = await parties.call("POST", "", referral.bundle)
        assert response.status_code == 412, response.text
        conflict = [i for i in response.json()["issue"] if documents[0] in i["diagnostics"]]
        assert len(conflict) == 1 and conflict[0]["code"] == "conflict", response.text
        assert "changed after this transaction created it" in conflict[0]["diagnostics"]
        kept = await parties.call("GET", documents[0])
        assert kept.status_code == 200 and kept.json()["meta"]["versionId"] == "2"
        assert await found(parties, "ServiceRequest", referral.key) == []

    async def test_changes_in_two_services_are_refused_before_any_commit(self, parties: Parties) -> None:
        existing = await parties.call("POST", "DocumentReference", {
            **referral_bundle(parties).entry("DocumentReference")["resource"], "identifier": []})
        assert existing.status_code == 201, existing.text
        referral, _ = await self._conflicting_referral(parties)
        document = {**existing.json(), "description": "更新"}
        referral.bundle["entry"].append({"resource": document, "request": {
            "method": "PUT", "url": f"DocumentReference/{document['id']}"}})
        response = await parties.call("POST", "", referral.bundle)
        assert response.status_code == 422, response.text
        assert "several services" in diagnostics(response)
        await stored_nowhere(parties, referral.key)
        assert (await parties.call("GET", f"DocumentReference/{document['id']}")).json()["meta"]["versionId"] == "1"

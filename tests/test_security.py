"""The access predicate on every path, the side channels other FHIR servers leaked through
(research/fhir-server-security-perf.md §B.5), break-the-glass and the audit trail.

Two organizations share nothing: A holds a patient's clinical records in the referral service; B
is party to one Encounter only. Every test asks, as B, a question whose answer would reveal A's
records if one path forgot the predicate.
"""

import asyncio
import base64
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support import outcome_code

ENCOUNTER_CLASS = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}
SECRET_CODE = {"system": "http://snomed.info/sct", "code": "86406008", "display": "HIV infection"}


@dataclass
class World:
    a: str
    b: str
    patient: str
    shared_encounter: dict[str, Any]  # A's, naming B as service provider: B sees it
    private_encounter: dict[str, Any]  # A's only
    condition: dict[str, Any]  # A's, on the shared encounter, with a code B must not learn


async def _as(api: Any, organization: str, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
    return await api.request(method, path, body, organization=organization, **kwargs)


@pytest.fixture(scope="module")
async def world(api: Any) -> World:
    a, b = f"Organization/sec-a-{uuid.uuid4().hex[:6]}", f"Organization/sec-b-{uuid.uuid4().hex[:6]}"
    for org in (a, b):
        created = await api.put(org, {"resourceType": "Organization", "id": org.split("/")[1], "name": org})
        assert created.status_code in (200, 201), created.text
    patient = (await _as(api, a, "POST", "Patient", {"resourceType": "Patient", "name": [{"family": "吴"}]})).json()
    subject = {"reference": f"Patient/{patient['id']}"}

    async def encounter(provider: str) -> dict[str, Any]:
        body = {"resourceType": "Encounter", "status": "finished", "class": ENCOUNTER_CLASS, "subject": subject,
                "serviceProvider": {"reference": provider}}
        response = await _as(api, a, "POST", "Encounter", body)
        assert response.status_code == 201, response.text
        return response.json()

    shared, private = await encounter(b), await encounter(a)
    condition = await _as(api, a, "POST", "Condition", {
        "resourceType": "Condition", "subject": subject, "code": {"coding": [SECRET_CODE]},
        "encounter": {"reference": f"Encounter/{shared['id']}"}})
    assert condition.status_code == 201, condition.text
    return World(a, b, f"Patient/{patient['id']}", shared, private, condition.json())


def _ids(bundle: Any) -> set[str]:
    return {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle.json().get("entry", [])
            if e.get("resource", {}).get("resourceType") != "OperationOutcome"}


class TestReadPaths:
    async def test_owner_and_party_read_others_get_404(self, api: Any, world: World) -> None:
        private = f"Encounter/{world.private_encounter['id']}"
        assert (await _as(api, world.a, "GET", private)).status_code == 200
        refused = await _as(api, world.b, "GET", private)
        assert refused.status_code == 404 and outcome_code(refused) == "not-found"
        assert (await _as(api, world.b, "GET", f"Encounter/{world.shared_encounter['id']}")).status_code == 200

    async def test_invisible_and_unknown_answer_the_same(self, api: Any, world: World) -> None:
        hidden = await _as(api, world.b, "GET", f"Condition/{world.condition['id']}")
        unknown = await _as(api, world.b, "GET", f"Condition/{uuid.uuid4()}")
        assert hidden.status_code == unknown.status_code == 404
        assert hidden.json()["issue"][0]["code"] == unknown.json()["issue"][0]["code"]

    async def test_vread_and_history_are_filtered(self, api: Any, world: World) -> None:
        condition = f"Condition/{world.condition['id']}"
        assert (await _as(api, world.b, "GET", f"{condition}/_history/1")).status_code == 404
        assert (await _as(api, world.b, "GET", f"{condition}/_history")).status_code == 404
        type_history = await _as(api, world.b, "GET", "Condition/_history")
        assert type_history.status_code == 200
        assert condition not in _ids(type_history)
        assert condition in _ids(await _as(api, world.a, "GET", "Condition/_history"))

    async def test_search_and_totals_count_only_visible_rows(self, api: Any, world: World) -> None:
        params = {"patient": world.patient, "_total": "accurate"}
        mine = await _as(api, world.a, "GET", "Condition", params=params)
        theirs = await _as(api, world.b, "GET", "Condition", params=params)
        assert mine.json()["total"] == 1 and theirs.json()["total"] == 0
        count = await _as(api, world.b, "GET", "Condition", params={"patient": world.patient, "_summary": "count"})
        assert count.json()["total"] == 0
        by_id = await _as(api, world.b, "GET", "Condition", params={"_id": world.condition["id"]})
        assert _ids(by_id) == set()


class TestSideChannels:
    async def test_revinclude_does_not_leak(self, api: Any, world: World) -> None:
        shared = world.shared_encounter["id"]
        found = await _as(api, world.b, "GET", "Encounter", params={"_id": shared, "_revinclude": "Condition:encounter"})
        assert found.status_code == 200, found.text
        assert _ids(found) == {f"Encounter/{shared}"}
        mine = await _as(api, world.a, "GET", "Encounter", params={"_id": shared, "_revinclude": "Condition:encounter"})
        assert f"Condition/{world.condition['id']}" in _ids(mine)

    async def test_unbounded_revinclude_is_refused(self, api: Any, world: World) -> None:
        everything = await _as(api, world.b, "GET", "Encounter", params={"_revinclude": "*"})
        assert everything.status_code == 400 and outcome_code(everything) == "not-supported"

    async def test_include_does_not_leak(self, api: Any, world: World) -> None:
        # A Provenance B owns may point at A's private encounter only if B could see it when writing.
        body = {"resourceType": "Provenance", "recorded": "2026-11-23T08:00:00+08:00",
                "target": [{"reference": f"Encounter/{world.private_encounter['id']}"}],
                "agent": [{"who": {"reference": world.b}}]}
        refused = await _as(api, world.b, "POST", "Provenance", body)
        assert refused.status_code == 422  # as if it did not exist: no oracle through references either
        found = await _as(api, world.b, "GET", "Condition", params={"_id": world.condition["id"],
                                                                      "_include": "Condition:encounter"})
        assert _ids(found) == set()

    async def test_has_is_no_oracle(self, api: Any, world: World) -> None:
        shared = world.shared_encounter["id"]
        probe = {"_id": shared, "_has:Condition:encounter:code": f"{SECRET_CODE['system']}|{SECRET_CODE['code']}"}
        assert _ids(await _as(api, world.a, "GET", "Encounter", params=probe)) == {f"Encounter/{shared}"}
        assert _ids(await _as(api, world.b, "GET", "Encounter", params=probe)) == set()

    async def test_chain_is_no_oracle(self, api: Any, world: World) -> None:
        # B's own Condition on an encounter B could see when writing; then A takes B off it.
        encounter = {**world.shared_encounter}
        encounter.pop("meta", None)
        body = {"resourceType": "Encounter", "status": "in-progress", "class": ENCOUNTER_CLASS,
                "subject": {"reference": world.patient}, "serviceProvider": {"reference": world.b}}
        created = (await _as(api, world.a, "POST", "Encounter", body)).json()
        mine = await _as(api, world.b, "POST", "Condition", {
            "resourceType": "Condition", "subject": {"reference": world.patient},
            "encounter": {"reference": f"Encounter/{created['id']}"}})
        assert mine.status_code == 201, mine.text
        chained = {"_id": mine.json()["id"], "encounter.status": "in-progress"}
        assert _ids(await _as(api, world.b, "GET", "Condition", params=chained)) == {f"Condition/{mine.json()['id']}"}
        withdrawn = {**created, "serviceProvider": {"reference": world.a}}
        assert (await _as(api, world.a, "PUT", f"Encounter/{created['id']}", withdrawn)).status_code == 200
        assert _ids(await _as(api, world.b, "GET", "Condition", params=chained)) == set()

    async def test_writes_to_what_is_not_visible_are_404_and_to_what_is_only_read_403(
        self, api: Any, world: World
    ) -> None:
        condition = {**world.condition, "note": [{"text": "改写"}]}
        assert (await _as(api, world.b, "PUT", f"Condition/{world.condition['id']}", condition)).status_code == 404
        assert (await _as(api, world.b, "DELETE", f"Condition/{world.condition['id']}")).status_code in (200, 204, 404)
        assert (await _as(api, world.a, "GET", f"Condition/{world.condition['id']}")).status_code == 200
        # Every member reads the directory; only the organization that registered a patient changes it.
        patch = [{"op": "add", "path": "/gender", "value": "male"}]
        patched = await api.request("PATCH", world.patient, patch, organization=world.b,
                                    headers={"Content-Type": "application/json-patch+json"})
        assert patched.status_code == 403 and outcome_code(patched) == "forbidden"
        assert "gender" not in (await _as(api, world.a, "GET", world.patient)).json()

    async def test_conditional_update_does_not_reach_what_is_invisible(self, api: Any, world: World) -> None:
        body = {"resourceType": "Condition", "subject": {"reference": world.patient}, "code": {"text": "B的记录"}}
        response = await _as(api, world.b, "PUT", f"Condition?_id={world.condition['id']}", body)
        assert response.status_code == 201  # no visible match: a new resource, A's stays as it was
        assert response.json()["id"] != world.condition["id"]
        assert (await _as(api, world.a, "GET", f"Condition/{world.condition['id']}")).json()["code"] == \
            world.condition["code"]

    async def test_sort_and_parameter_names_cannot_reach_internal_columns(self, api: Any, world: World) -> None:
        for params in ({"_sort": "owner"}, {"_sort": "rid;DROP TABLE fhir_resource"},
                       {"owner'--": world.a}):
            response = await _as(api, world.b, "GET", "Condition", params=params,
                                 headers={"Prefer": "handling=strict"})
            assert response.status_code == 400, params
        assert (await _as(api, world.a, "GET", f"Condition/{world.condition['id']}")).status_code == 200


class TestBreakTheGlass:
    BTG = "system/*.rs alliance/break-glass"

    async def test_reads_with_a_reason_and_is_audited(self, api: Any, world: World) -> None:
        condition = f"Condition/{world.condition['id']}"
        reason = "急诊昏迷患者，需查既往诊断"
        from urllib.parse import quote

        response = await api.request("GET", condition, organization=world.b, scope=self.BTG,
                                     headers={"X-Break-Glass-Reason": quote(reason)})
        assert response.status_code == 200, response.text
        await api.system.state.audit.flush()
        audit = await _as(api, world.b, "GET", "AuditEvent", params={"agent": world.b, "_count": "100"})
        assert audit.status_code == 200, audit.text
        flagged = [e["resource"] for e in audit.json()["entry"]
                   if e["resource"].get("purposeOfEvent", [{}])[0].get("text") == reason]
        assert flagged, "the emergency read is not in the audit"
        assert flagged[0]["purposeOfEvent"][0]["coding"][0]["code"] == "BTG"
        assert {"reference": world.patient} in [e.get("what") for e in flagged[0]["entity"]]

    async def test_needs_the_role_a_reason_and_a_read(self, api: Any, world: World) -> None:
        condition = f"Condition/{world.condition['id']}"
        without_role = await api.request("GET", condition, organization=world.b,
                                         headers={"X-Break-Glass-Reason": "urgent care"})
        assert without_role.status_code == 403
        no_reason = await api.request("GET", condition, organization=world.b, scope=self.BTG,
                                      headers={"X-Break-Glass-Reason": " "})
        assert no_reason.status_code == 400
        write = await api.request("PUT", condition, {**world.condition}, organization=world.b, scope=self.BTG,
                                  headers={"X-Break-Glass-Reason": "urgent care"})
        assert write.status_code == 403
        assert (await _as(api, world.b, "GET", condition)).status_code == 404  # the glass closes again


class TestAudit:
    async def test_every_access_leaves_an_audit_event_its_agent_can_read(self, api: Any, world: World) -> None:
        await _as(api, world.a, "GET", f"Condition/{world.condition['id']}")
        await _as(api, world.b, "GET", f"Condition/{world.condition['id']}")  # refused, audited as well
        await api.system.state.audit.flush()
        mine = await _as(api, world.a, "GET", "AuditEvent", params={"agent": world.a, "entity": world.patient})
        events = [e["resource"] for e in mine.json()["entry"]]
        reads = [e for e in events if e["subtype"][0]["code"] == "read" and e["outcome"] == "0"]
        assert reads and reads[0]["agent"][0]["who"]["reference"] == world.a
        refused = await _as(api, world.b, "GET", "AuditEvent", params={"agent": world.b, "outcome": "4"})
        assert any(e["resource"]["outcomeDesc"].startswith("HTTP 404") for e in refused.json()["entry"])
        others = await _as(api, world.b, "GET", "AuditEvent", params={"agent": world.a})
        assert _ids(others) == set()  # A's audit trail is A's

    async def test_the_writer_lets_requests_in_while_it_builds_a_batch(self, api: Any) -> None:
        """Building and indexing a batch's AuditEvents in one go held the event loop for milliseconds;
        the writer yields every few notes (on SQLite its statements never yield by themselves)."""
        from fhirkit.search.values import now_micros
        from gateway.audit import YIELD_EVERY, AccessNote

        notes = [AccessNote("GET", ["Observation", f"yield-{i}"], "", 200, "test", "Organization/test-org",
                            now_micros()) for i in range(25 * YIELD_EVERY)]
        turns = 0
        writing = True

        async def another_request() -> None:
            nonlocal turns
            while writing:
                turns += 1
                await asyncio.sleep(0)

        other = asyncio.create_task(another_request())
        await asyncio.sleep(0)
        before = turns
        await api.system.state.audit._write(notes)
        during, writing = turns - before, False
        await other
        # 25 turns while the events are built and 25 while they are indexed, at least; without the
        # yields only the statements' own (about fifteen, as many for 200 notes as for 2).
        assert during >= 50, during

    async def test_only_auditors_read_the_audit_trail(self, api: Any, world: World) -> None:
        plain = await api.request("GET", "AuditEvent", organization=world.a, scope="system/*.cruds")
        assert plain.status_code == 403 and outcome_code(plain) == "forbidden"
        assert (await _as(api, world.a, "GET", "AuditEvent", params={"agent": world.a})).status_code == 200

    async def test_the_trail_is_append_only(self, api: Any, world: World) -> None:
        record = {"resourceType": "AuditEvent", "type": {"system": "http://dicom.nema.org/resources/ontology/DCM",
                  "code": "110110", "display": "Patient Record"}, "recorded": "2026-11-23T08:00:00+08:00",
                  "agent": [{"who": {"reference": world.a}, "requestor": True}],
                  "source": {"observer": {"display": "乡镇卫生院HIS"}}}
        sent = await _as(api, world.a, "POST", "AuditEvent", record)  # another system's record (IHE ATNA)
        assert sent.status_code == 201, sent.text
        stored = sent.json()
        changed = await _as(api, world.a, "PUT", f"AuditEvent/{stored['id']}", {**stored, "outcome": "8"})
        assert changed.status_code == 403
        deleted = await _as(api, world.a, "DELETE", f"AuditEvent/{stored['id']}")
        assert deleted.status_code == 403
        assert (await _as(api, world.a, "GET", f"AuditEvent/{stored['id']}")).json()["meta"]["versionId"] == "1"
        # Stored once (no history copy: StoreConfig.append_only), read back whole through vread and history.
        version = await _as(api, world.a, "GET", f"AuditEvent/{stored['id']}/_history/1")
        assert version.status_code == 200 and version.json() == stored
        history = (await _as(api, world.a, "GET", f"AuditEvent/{stored['id']}/_history")).json()
        assert [(e["resource"], e["request"]["method"], e["response"]["status"]) for e in history["entry"]] == [
            (stored, "POST", "201 Created")]
        listed = (await _as(api, world.a, "GET", "AuditEvent/_history", params={"_count": "1000"})).json()
        assert [e["resource"]["id"] for e in listed["entry"]].count(stored["id"]) == 1

    async def test_a_search_leaves_one_event_per_patient_it_returned(self, api: Any, world: World) -> None:
        second = (await _as(api, world.a, "POST", "Patient", {"resourceType": "Patient"})).json()
        await _as(api, world.a, "POST", "Condition", {"resourceType": "Condition",
                                                      "subject": {"reference": f"Patient/{second['id']}"}})
        marker = f"audit-{uuid.uuid4().hex[:8]}"
        found = await _as(api, world.a, "GET", "Condition", params={"_count": "50", "_tag:not": marker})
        patients = {e["resource"]["subject"]["reference"] for e in found.json()["entry"]}
        assert {world.patient, f"Patient/{second['id']}"} <= patients
        await api.system.state.audit.flush()
        for patient in (world.patient, f"Patient/{second['id']}"):
            events = await _as(api, world.a, "GET", "AuditEvent", params={"entity": patient, "subtype": "search-type"})
            mine = [e["resource"] for e in events.json()["entry"]
                    if marker in base64.b64decode(next(x["query"] for x in e["resource"]["entity"] if "query" in x)).decode()]
            assert len(mine) == 1
            assert [x["what"] for x in mine[0]["entity"] if "what" in x] == [{"reference": patient}]

    async def test_the_hash_chain_finds_a_changed_record(self, api: Any, world: World) -> None:
        from sqlalchemy import select, update

        from fhirkit.store.tables import resource
        from gateway import audit_chain

        await _as(api, world.a, "GET", world.patient)
        await api.system.state.audit.flush()
        database = api.system.state.apps["platform"].state.database
        async with database.transaction(write=False) as conn:
            intact = await audit_chain.verify(conn)
        assert intact.broken_at is None and intact.checked > 0
        async with database.transaction(write=True) as conn:
            row = (await conn.execute(select(audit_chain.audit_chain).order_by(audit_chain.audit_chain.c.seq)
                                      .limit(1))).first()
            where = (resource.c.resource_type == "AuditEvent") & (resource.c.resource_id == row.audit_id)
            original = (await conn.execute(select(resource.c.content).where(where))).scalar_one()
            await conn.execute(update(resource).where(where).values(content=original.replace(b'"0"', b'"8"')))
        try:
            async with database.transaction(write=False) as conn:
                broken = await audit_chain.verify(conn)
            assert broken.broken_at == row.seq and "changed" in (broken.problem or "")
        finally:
            async with database.transaction(write=True) as conn:
                await conn.execute(update(resource).where(where).values(content=original))


class TestRateLimits:
    async def test_a_client_over_its_limit_gets_429_with_retry_after(self, api: Any, world: World) -> None:
        from gateway.rate_limit import RateLimiter

        normal = api.system.state.rate_limiter
        api.system.state.rate_limiter = RateLimiter(rate=0.5, burst=2)
        try:
            answers = [await _as(api, world.a, "GET", world.patient) for _ in range(3)]
        finally:
            api.system.state.rate_limiter = normal
        assert [r.status_code for r in answers] == [200, 200, 429]
        assert answers[2].headers["retry-after"] == "2"
        assert outcome_code(answers[2]) == "throttled"


class TestRefusalsAreAudited:
    async def test_a_failed_authentication_leaves_an_audit_event(self, api: Any, world: World) -> None:
        from sqlalchemy import select

        from fhirkit.store.tables import resource

        bad = await api.client.get(f"/fhir/{world.patient}", headers={"Authorization": "Bearer not-a-token"})
        assert bad.status_code == 401
        await api.system.state.audit.flush()
        database = api.system.state.apps["platform"].state.database
        async with database.transaction(write=False) as conn:
            rows = await conn.execute(select(resource.c.content).where(resource.c.resource_type == "AuditEvent"))
            contents = [row[0] for row in rows]
        refused = [c for c in contents if b'"unauthenticated"' in c and b"HTTP 401" in c]
        assert refused, "a failed authentication left no AuditEvent"
        assert b"not-a-token" not in refused[-1]  # the audit keeps no credentials

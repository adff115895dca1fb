"""Results sharing, issue 7: closing a critical value with `Observation/$acknowledge-critical`, and
results that follow a patient merge (`Patient/$merge` in the directory) to the surviving record.

The demo alliance, catalog and quality evaluations are loaded as in test_results_sharing.py, whose
helpers (a center's upload, `$recognition-check`) are reused. Critical-value tests use their own
demo patients (pat-015x); merge tests create their own patients.
"""

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from directory.identifiers import NATIONAL_ID_SYSTEM, mrn_system, national_id_check_char
from tests.support import eventually, outcome_code
from tests.test_results_sharing import (
    ACK,
    COUNTY,
    LAB,
    OTHER_TOWNSHIP,
    POTASSIUM,
    TOWNSHIP,
    candidates,
    check,
    demo,  # noqa: F401  (the module fixture loading the demo alliance)
    lab_result,
    locations,
    observation,
    read_as,
    reasons,
    refer,
    report,
    transaction,
    upload,
    value,
)

pytestmark = pytest.mark.usefixtures("demo")

RECEIVER = "Practitioner/prac-county-01"  # 方霞, who also sits at 溪口镇卫生院
OPERATION = "$acknowledge-critical"


def acknowledgement(receiver: str | None = RECEIVER, **extra: Any) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = []
    if receiver is not None:
        parameters.append({"name": "acknowledgedBy", "valueReference": {"reference": receiver}})
    for name, item in extra.items():
        parameters.append({"name": name, ("valueString" if name == "note" else "valueDateTime"): item})
    return {"resourceType": "Parameters", "parameter": parameters}


async def acknowledge(api: Any, result: str, body: dict[str, Any] | None = None, *, caller: str = LAB,
                      level: str = "center", **headers: str) -> Any:
    return await api.post(f"{result}/{OPERATION}", body or acknowledgement(), organization=caller, level=level,
                          headers=headers or None)


async def critical_result(api: Any, patient: str, value_mmol: float = 2.6) -> tuple[str, dict[str, Any]]:
    """A critically low serum potassium (LL) in its report; returns Observation/id and the bundle to re-send."""
    obs = observation(patient, LAB, "2823-3", "钾", value=value_mmol, interpretation="LL")
    rep = report(patient, LAB, "24323-8", "生化检验报告", "CH", [])
    bundle, urls = transaction(obs, rep)
    rep["result"] = [{"reference": urls[0]}]
    return locations(await upload(api, LAB, bundle))[0], bundle


def extension_parts(resource: dict[str, Any]) -> dict[str, Any]:
    found = next(e for e in resource.get("extension") or [] if e["url"] == ACK)
    return {p["url"]: next(v for k, v in p.items() if k.startswith("value")) for p in found["extension"]}


async def versions(api: Any, result: str) -> list[str]:
    history = await api.get(f"{result}/_history", organization=LAB, level="center")
    assert history.status_code == 200, history.text
    return [e["resource"]["meta"]["versionId"] for e in history.json()["entry"]]


async def provenances(api: Any, result: str) -> list[dict[str, Any]]:
    found = await api.get("Provenance", params={"target": result}, organization=LAB, level="center")
    assert found.status_code == 200, found.text
    return [e["resource"] for e in found.json().get("entry", [])]


# ------------------------------------------------------------------------------ $acknowledge-critical

class TestAcknowledgeCritical:
    async def test_acknowledging_closes_the_loop_and_the_check_then_recognizes(self, api: Any, system: Any) -> None:
        patient = "Patient/pat-0150"
        result, _ = await critical_result(api, patient)
        assert reasons(await check(api, patient, POTASSIUM)) == ["critical-unacknowledged"]
        response = await acknowledge(api, result, acknowledgement(note="已电话通知溪口镇卫生院方霞医生"))
        assert response.status_code == 200, response.text
        assert response.headers["ETag"] == 'W/"2"'
        acknowledged = response.json()
        assert acknowledged["meta"]["versionId"] == "2"
        parts = extension_parts(acknowledged)
        assert parts["acknowledgedBy"] == {"reference": RECEIVER}
        assert parts["note"] == "已电话通知溪口镇卫生院方霞医生" and parts["acknowledgedAt"]
        assert acknowledged["valueQuantity"]["value"] == 2.6  # the finding itself is untouched
        assert await versions(api, result) == ["2", "1"]  # history kept
        [record] = await provenances(api, result)
        assert record["target"] == [{"reference": f"{result}/_history/2"}]
        assert record["entity"] == [{"role": "revision", "what": {"reference": f"{result}/_history/1"}}]
        assert {a["who"].get("reference") for a in record["agent"]} == {LAB, RECEIVER}
        answer = await check(api, patient, POTASSIUM)
        assert reasons(answer) == ["recognizable"] and value(answer["parameter"], "recognizable") is True
        # The gateway's audit trail has the call (an auditor of the center sees its own events).
        await system.state.audit.flush()
        audit = await api.get("AuditEvent", params={"entity": result}, organization=LAB, level="center")
        events = [e["resource"] for e in audit.json().get("entry", [])]
        assert any(e["subtype"][0]["code"] == "operation" and e["action"] == "E" for e in events), audit.text

    @pytest.mark.parametrize("report_first", [False, True])
    async def test_a_report_is_critical_while_its_result_is_whatever_the_bundle_order(
            self, api: Any, system: Any, report_first: bool) -> None:
        from sqlalchemy import select

        from results_sharing import db

        patient = f"Patient/pat-016{int(report_first)}"
        obs = observation(patient, LAB, "2823-3", "钾", value=2.5, interpretation="LL")
        rep = report(patient, LAB, "24323-8", "生化检验报告", "CH", [])
        bundle, urls = transaction(*((rep, obs) if report_first else (obs, rep)))
        rep["result"] = [{"reference": urls[1] if report_first else urls[0]}]
        written = locations(await upload(api, LAB, bundle))
        report_id = next(r for r in written if r.startswith("DiagnosticReport/")).split("/")[1]
        result = next(r for r in written if r.startswith("Observation/"))

        async def report_critical() -> bool:
            engine = system.state.apps["results-sharing"].state.database.engine
            async with engine.connect() as conn:
                rows = await conn.execute(select(db.result.c.critical_open).where(
                    db.result.c.resource_type == "DiagnosticReport", db.result.c.resource_id == report_id))
                return any(row[0] for row in rows)

        assert await report_critical()
        assert (await acknowledge(api, result)).status_code == 200
        assert not await report_critical()

    async def test_a_second_call_answers_the_current_version_and_writes_nothing(self, api: Any) -> None:
        result, _ = await critical_result(api, "Patient/pat-0151")
        first = await acknowledge(api, result)
        assert first.status_code == 200, first.text
        again = await acknowledge(api, result, acknowledgement("Practitioner/prac-prov-01"))
        assert again.status_code == 200, again.text
        assert again.json() == first.json()  # the first acknowledgement stands
        assert await versions(api, result) == ["2", "1"]
        assert len(await provenances(api, result)) == 1

    async def test_if_match_is_honoured_and_a_stale_one_is_412(self, api: Any) -> None:
        result, _ = await critical_result(api, "Patient/pat-0152")
        stale = await acknowledge(api, result, **{"If-Match": 'W/"7"'})
        assert stale.status_code == 412 and outcome_code(stale) == "conflict"
        current = await acknowledge(api, result, **{"If-Match": 'W/"1"'})
        assert current.status_code == 200, current.text
        assert (await acknowledge(api, result, **{"If-Match": 'W/"1"'})).status_code == 412  # now stale

    async def test_refusals(self, api: Any) -> None:
        patient = "Patient/pat-0153"
        result, _ = await critical_result(api, patient)
        normal = await lab_result(api, patient, "2951-2", "钠", value=140)

        async def refused(target: str, body: dict[str, Any], caller: str = LAB, level: str = "center") -> tuple[int, str]:
            response = await acknowledge(api, target, body, caller=caller, level=level)
            return response.status_code, outcome_code(response)

        assert await refused(normal, acknowledgement()) == (422, "business-rule")  # no critical value
        assert await refused("Observation/rs-no-such-result", acknowledgement()) == (404, "not-found")
        assert await refused(result, acknowledgement(None)) == (400, "invalid")
        assert await refused(result, acknowledgement("Organization/thc-xikou")) == (400, "invalid")
        assert await refused(result, acknowledgement("Practitioner/nobody-here")) == (422, "business-rule")
        assert await refused(result, acknowledgement(acknowledgedAt="tomorrow")) == (400, "invalid")
        assert await refused(result, acknowledgement(acknowledgedAt="2099-01-01T08:00:00+08:00")) == (422, "business-rule")
        assert await refused(result, acknowledgement(acknowledgedAt="2001-01-01T08:00:00+08:00")) == (422, "business-rule")
        assert await refused(result, {"resourceType": "Patient"}) == (400, "invalid")
        # An organization that cannot read the result does not learn it exists; one that reads it
        # (its recognition check opened it) may not record the producer's closure.
        assert await refused(result, acknowledgement(), OTHER_TOWNSHIP, "township") == (404, "not-found")
        await check(api, patient, POTASSIUM)
        assert await read_as(api, TOWNSHIP, result) == 200
        assert await refused(result, acknowledgement(), TOWNSHIP, "township") == (403, "forbidden")
        # A token without the right to change Observations is refused at the gateway.
        narrow = await api.post(f"{result}/{OPERATION}", acknowledgement(), organization=LAB, level="center",
                                scope="system/Observation.rs")
        assert narrow.status_code == 403
        wrong_method = await api.get(f"{result}/{OPERATION}", organization=LAB, level="center")
        assert wrong_method.status_code == 405
        assert await versions(api, result) == ["1"]  # none of these wrote anything
        assert reasons(await check(api, patient, POTASSIUM)) == ["critical-unacknowledged"]

    async def test_a_withdrawn_critical_value_is_not_acknowledged(self, api: Any) -> None:
        result, bundle = await critical_result(api, "Patient/pat-0154")
        bundle["entry"][0]["resource"]["status"] = "entered-in-error"
        await upload(api, LAB, bundle)
        response = await acknowledge(api, result)
        assert response.status_code == 422 and outcome_code(response) == "business-rule"

    async def test_concurrent_calls_write_exactly_one_version(self, api: Any) -> None:
        result, _ = await critical_result(api, "Patient/pat-0155")
        answers = await asyncio.gather(*(acknowledge(api, result) for _ in range(4)))
        assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
        assert {a.json()["meta"]["versionId"] for a in answers} == {"2"}
        assert await versions(api, result) == ["2", "1"]
        assert len(await provenances(api, result)) == 1
        # With the same If-Match, one wins and the others are told they were too late.
        other, _ = await critical_result(api, "Patient/pat-0156")
        raced = await asyncio.gather(*(acknowledge(api, other, **{"If-Match": 'W/"1"'}) for _ in range(3)))
        assert sorted(a.status_code for a in raced) == [200, 412, 412]
        assert await versions(api, other) == ["2", "1"]

    async def test_a_resend_without_it_keeps_it_unless_the_value_changed(self, api: Any) -> None:
        patient = "Patient/pat-0157"
        result, bundle = await critical_result(api, patient)
        assert (await acknowledge(api, result)).status_code == 200
        await upload(api, LAB, bundle)  # the LIS re-sends what it has, without the acknowledgement
        assert await versions(api, result) == ["2", "1"]
        assert reasons(await check(api, patient, POTASSIUM)) == ["recognizable"]
        corrected = bundle["entry"][0]["resource"]
        corrected["status"] = "corrected"
        corrected["valueQuantity"]["value"] = 2.3  # a new critical value must be called in again
        await upload(api, LAB, bundle)
        assert ACK not in {e["url"] for e in (await api.get(result, organization=LAB, level="center")).json()
                           .get("extension", [])}
        assert reasons(await check(api, patient, POTASSIUM)) == ["critical-unacknowledged"]

    async def test_the_capability_statement_lists_it(self, api: Any) -> None:
        metadata = (await api.get("metadata")).json()
        observation_rest = next(r for r in metadata["rest"][0]["resource"] if r["type"] == "Observation")
        names = {op["name"]: op["definition"] for op in observation_rest.get("operation", [])}
        assert names["acknowledge-critical"].endswith("/OperationDefinition/Observation-acknowledge-critical")


# ------------------------------------------------------------------------------ following a merge

def new_national_id() -> str:
    first17 = f"330829{random.randint(1931, 1999)}{random.randint(1, 12):02d}{random.randint(1, 28):02d}" \
              f"{random.randint(100, 999)}"
    return first17 + national_id_check_char(first17)


async def new_patient(api: Any, *, nid: str | None = None, mrn: tuple[str, str] | None = None) -> str:
    body: dict[str, Any] = {"resourceType": "Patient", "name": [{"family": "周", "given": ["明"]}],
                            "gender": "male", "birthDate": "1962-04-18", "identifier": []}
    if nid:
        body["identifier"].append({"system": NATIONAL_ID_SYSTEM, "value": nid})
    if mrn:
        body["identifier"].append({"system": mrn_system(mrn[0]), "value": mrn[1]})
    created = await api.post("Patient", body)
    assert created.status_code == 201, created.text
    return f"Patient/{created.json()['id']}"


async def merge(api: Any, source: str, target: str) -> None:
    response = await api.post("Patient/$merge", {"resourceType": "Parameters", "parameter": [
        {"name": "source-patient", "valueReference": {"reference": source}},
        {"name": "target-patient", "valueReference": {"reference": target}}]})
    assert response.status_code == 200, response.text


async def until(probe: Callable[[], Awaitable[Any]], done: Callable[[Any], bool], seconds: float = 5.0) -> Any:
    """`probe()` once `done` says so: results sharing learns of a merge from the directory's events."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        answer = await probe()
        if done(answer) or asyncio.get_running_loop().time() > deadline:
            return answer
        await asyncio.sleep(0.02)


def results_of(answer: dict[str, Any]) -> list[str]:
    return [c["result"]["reference"] for c in candidates(answer)]


async def merged_pair(api: Any) -> tuple[str, str, str, str, str]:
    """A township record (no national ID) holding a potassium result, merged into the county's
    record of the same person; returns source, target, the result, the township MRN and the ID."""
    township_mrn = (f"town-{uuid.uuid4().hex[:6]}", "T-1")
    nid = new_national_id()
    source = await new_patient(api, mrn=township_mrn)
    target = await new_patient(api, nid=nid)
    result = await lab_result(api, source)
    assert results_of(await check(api, target, POTASSIUM)) == []
    await merge(api, source, target)
    return source, target, result, f"{mrn_system(township_mrn[0])}|{township_mrn[1]}", nid


class TestFollowingMerges:
    async def test_the_targets_check_finds_the_sources_result(self, api: Any) -> None:
        source, target, result, township_id, nid = await merged_pair(api)
        by_reference = await until(lambda: check(api, target, POTASSIUM), lambda a: results_of(a) == [result])
        assert results_of(by_reference) == [result] and reasons(by_reference) == ["recognizable"]
        assert value(by_reference["parameter"], "patient") == {"reference": target}
        by_national_id = await check(api, {"system": NATIONAL_ID_SYSTEM, "value": nid}, POTASSIUM)
        assert results_of(by_national_id) == [result]
        # Both records carry the township's record number now: it still names one person.
        system_, number = township_id.split("|")
        by_old_number = await check(api, {"system": system_, "value": number}, POTASSIUM)
        assert value(by_old_number["parameter"], "patient") == {"reference": target}
        by_source = await check(api, source, POTASSIUM)  # the merged-away record answers as the survivor
        assert value(by_source["parameter"], "patient") == {"reference": target}
        assert results_of(by_source) == [result]

    async def test_search_by_the_target_finds_them_and_the_result_is_unchanged(self, api: Any) -> None:
        source, target, result, _, _ = await merged_pair(api)
        found = await until(lambda: api.get("Observation", params={"patient": target}, organization=LAB,
                                            level="center"),
                            lambda r: r.json().get("total") == 1)
        assert [f"Observation/{e['resource']['id']}" for e in found.json()["entry"]] == [result]
        stored = (await api.get(result, organization=LAB, level="center")).json()
        assert stored["subject"] == {"reference": source} and stored["meta"]["versionId"] == "1"
        # A result the township's LIS sends under the old record after the merge is the target's too.
        later = await lab_result(api, source, "2951-2", "钠", value=141)
        both = await api.get("Observation", params={"patient": target, "_total": "accurate"}, organization=LAB,
                             level="center")
        assert {f"Observation/{e['resource']['id']}" for e in both.json()["entry"]} == {result, later}
        # A new version of the old result is re-indexed from scratch: it stays the target's.
        stored["note"] = [{"text": "复核"}]
        updated = await api.put(result, stored, organization=LAB, level="center")
        assert updated.status_code == 200 and updated.json()["meta"]["versionId"] == "2", updated.text
        again = await api.get("Observation", params={"patient": target, "_id": stored["id"]}, organization=LAB,
                              level="center")
        assert again.json()["total"] == 1, again.text

    async def test_a_recognition_check_grant_opens_the_sources_result(self, api: Any) -> None:
        _, target, result, _, _ = await merged_pair(api)
        assert await read_as(api, TOWNSHIP, result) == 404
        await until(lambda: check(api, target, POTASSIUM), lambda a: results_of(a) == [result])
        assert await read_as(api, TOWNSHIP, result) == 200
        assert await read_as(api, OTHER_TOWNSHIP, result) == 404

    async def test_a_referral_of_the_target_opens_the_sources_results(self, api: Any) -> None:
        source, target, result, _, _ = await merged_pair(api)
        sodium = await lab_result(api, source, "2951-2", "钠", value=139)
        await until(lambda: check(api, target, POTASSIUM, caller=OTHER_TOWNSHIP),
                    lambda a: results_of(a) == [result])
        task = await refer(api, target)
        accepted = await api.post(f"Task/{task['id']}/$accept", {"resourceType": "Parameters"},
                                  organization=COUNTY, level="county",
                                  headers={"If-Match": f'W/"{task["meta"]["versionId"]}"'})
        assert accepted.status_code == 200, accepted.text
        seen = await eventually(lambda: api.get(sodium, organization=COUNTY, level="county"))
        assert seen.status_code == 200
        listed = await api.get("Observation", params={"patient": target}, organization=COUNTY, level="county")
        assert {f"Observation/{e['resource']['id']}" for e in listed.json()["entry"]} == {result, sodium}

    async def test_an_organization_without_a_relationship_still_sees_nothing(self, api: Any) -> None:
        source, target, result, _, _ = await merged_pair(api)
        await until(lambda: api.get("Observation", params={"patient": target}, organization=LAB, level="center"),
                    lambda r: r.json().get("total") == 1)
        assert await read_as(api, OTHER_TOWNSHIP, result) == 404
        for patient in (target, source):
            found = await api.get("Observation", params={"patient": patient, "_total": "accurate"},
                                  organization=OTHER_TOWNSHIP, level="township")
            assert found.status_code == 200 and found.json()["total"] == 0
        # Naming another requester answers the question but opens nothing, merged or not.
        await check(api, target, POTASSIUM, caller=OTHER_TOWNSHIP, requester=TOWNSHIP)
        assert await read_as(api, OTHER_TOWNSHIP, result) == 404

    async def test_a_merge_of_a_merge_reaches_the_last_record(self, api: Any) -> None:
        first = await new_patient(api)
        second = await new_patient(api)
        last = await new_patient(api, nid=new_national_id())
        oldest = await lab_result(api, first)
        middle = await lab_result(api, second)
        await merge(api, first, second)
        await until(lambda: check(api, second, POTASSIUM), lambda a: len(results_of(a)) == 2)
        await merge(api, second, last)
        answer = await until(lambda: check(api, last, POTASSIUM), lambda a: len(results_of(a)) == 2)
        assert set(results_of(answer)) == {oldest, middle}
        found = await api.get("Observation", params={"patient": last}, organization=LAB, level="center")
        assert {f"Observation/{e['resource']['id']}" for e in found.json()["entry"]} == {oldest, middle}

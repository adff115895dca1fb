"""Search across services and the remaining search gaps of the foundation issue: `_revinclude` and
`_include:iterate` whose resources other services hold, `previous` links of merged searches,
`_elements` paths, and dates without a time zone read in the alliance's zone (+08:00).

Each test makes its own data under a fresh identifier system or fresh ids, so the session's other
data never changes an expected result.
"""

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.support import outcome_code
from tests.test_fhir_search import created_id, ids, link, new_observation, new_patient, new_system, search

BASE = "http://county-alliance.org/fhir"
TELEMEDICINE = {"system": f"{BASE}/CodeSystem/telemedicine-category", "code": "remote-ecg"}


async def new_organization(api: Any, name: str, parent: str | None = None) -> str:
    org_id = f"gap-{uuid.uuid4().hex[:10]}"
    body: dict[str, Any] = {"resourceType": "Organization", "id": org_id, "name": name}
    if parent:
        body["partOf"] = {"reference": f"Organization/{parent}"}
    response = await api.put(f"Organization/{org_id}", body)
    assert response.status_code == 201, response.text
    return org_id


async def new_task(api: Any, patient: str | None, **extra: Any) -> str:
    body: dict[str, Any] = {"resourceType": "Task", "status": "requested", "intent": "order", **extra}
    if patient:
        body["for"] = {"reference": f"Patient/{patient}"}
    return created_id(await api.post("Task", body))


async def new_request(api: Any, patient: str, *, telemedicine: bool = False, **extra: Any) -> str:
    body: dict[str, Any] = {"resourceType": "ServiceRequest", "status": "completed", "intent": "proposal",
                            "subject": {"reference": f"Patient/{patient}"}, **extra}
    if telemedicine:
        body["category"] = [{"coding": [TELEMEDICINE]}]
    return created_id(await api.post("ServiceRequest", body))


def outcomes(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", []) if e["search"]["mode"] == "outcome"]


# ------------------------------------------------------------------- _revinclude across services


async def test_revinclude_of_a_type_another_service_holds(api):
    patient = await new_patient(api, new_system(), "1")
    tasks = {await new_task(api, patient), await new_task(api, patient)}
    bundle = await search(api, f"Patient?_id={patient}&_revinclude=Task:patient")
    assert ids(bundle) == [patient] and bundle["total"] == 1
    assert set(ids(bundle, "include")) == tasks
    assert not outcomes(bundle)
    assert all(e["fullUrl"].endswith(f"/Task/{e['resource']['id']}") for e in bundle["entry"][1:])


async def test_revinclude_of_a_shared_type_asks_every_owner(api):
    patient = await new_patient(api, new_system(), "1")
    referral = await new_request(api, patient)
    remote = await new_request(api, patient, telemedicine=True)
    assert remote.startswith("tm-") and not referral.startswith("tm-")  # two owners
    bundle = await search(api, f"Patient?_id={patient}&_revinclude=ServiceRequest:subject")
    assert set(ids(bundle, "include")) == {referral, remote}


async def test_revinclude_shows_only_what_the_caller_could_search(api):
    """A stranger organization sees the (public) Patient, never the Tasks it could not search for;
    a Task that names it as owner it sees, through _revinclude as by searching."""
    stranger = await new_organization(api, "陌生卫生院")
    patient = await new_patient(api, new_system(), "1")
    hidden = await new_task(api, patient)
    addressed = await new_task(api, patient, owner={"reference": f"Organization/{stranger}"})
    as_stranger = {"organization": f"Organization/{stranger}", "level": "township"}
    bundle = await search(api, f"Patient?_id={patient}&_revinclude=Task:patient", **as_stranger)
    assert ids(bundle) == [patient]
    direct = await search(api, f"Task?patient=Patient/{patient}", **as_stranger)
    assert ids(bundle, "include") == ids(direct) == [addressed]
    assert hidden not in ids(bundle, "include")


async def test_revinclude_needs_the_scope_to_search_its_type(api):
    patient = await new_patient(api, new_system(), "1")
    await new_task(api, patient)
    bundle = await search(api, f"Patient?_id={patient}&_revinclude=Task:patient", scope="system/Patient.rs")
    assert ids(bundle) == [patient] and not ids(bundle, "include")
    (warning,) = outcomes(bundle)
    assert warning["issue"][0]["code"] == "forbidden" and "Task" in warning["issue"][0]["diagnostics"]


async def test_the_paging_links_keep_the_revinclude(api):
    system = new_system()
    patients = [await new_patient(api, system, str(i)) for i in range(2)]
    tasks = {patient: await new_task(api, patient) for patient in patients}
    first = await search(api, f"Patient?identifier={system}|&_sort=identifier&_count=1&_revinclude=Task:patient")
    assert "_revinclude=Task%3Apatient" in link(first, "next")
    second = await search(api, link(first, "next"))
    assert ids(second) == [patients[1]] and ids(second, "include") == [tasks[patients[1]]]
    back = await search(api, link(second, "previous"))
    assert ids(back) == [patients[0]] and ids(back, "include") == [tasks[patients[0]]]


# ------------------------------------------------------------------ _include:iterate across services


async def test_include_iterate_follows_across_services(api):
    county = await new_organization(api, "县医院")
    township = await new_organization(api, "镇卫生院", county)
    doctor = created_id(await api.post("Practitioner", {"resourceType": "Practitioner"}))
    patient = await new_patient(api, new_system(), "1", managingOrganization={"reference": f"Organization/{township}"},
                                generalPractitioner=[{"reference": f"Practitioner/{doctor}"}])
    task = await new_task(api, patient)
    query = (f"Task?_id={task}&_include=Task:patient&_include:iterate=Patient:general-practitioner"
             f"&_include:iterate=Patient:organization&_include:iterate=Organization:partof")
    bundle = await search(api, query)
    assert ids(bundle) == [task]
    assert set(ids(bundle, "include")) == {patient, doctor, township, county}
    # Without :iterate only the first step is taken.
    once = await search(api, f"Task?_id={task}&_include=Task:patient&_include=Patient:organization".replace(
        "_include=Patient", "_include:iterate=Patient").replace(":iterate=Patient:organization", "=Task:patient"))
    assert set(ids(once, "include")) == {patient}


async def test_revinclude_iterate_across_services(api):
    patient = await new_patient(api, new_system(), "1")
    request = await new_request(api, patient)
    parent = await new_task(api, patient, focus={"reference": f"ServiceRequest/{request}"})
    child = await new_task(api, None, partOf=[{"reference": f"Task/{parent}"}])  # names no patient
    bundle = await search(api, f"Patient?_id={patient}&_revinclude=Task:patient"
                               f"&_revinclude:iterate=Task:part-of&_include:iterate=Task:focus")
    assert ids(bundle) == [patient]
    assert set(ids(bundle, "include")) == {parent, child, request}
    plain = await search(api, f"Patient?_id={patient}&_revinclude=Task:patient&_revinclude=Task:part-of")
    assert set(ids(plain, "include")) == {parent}  # part-of is not followed from the Tasks found


async def test_include_iterate_ends_on_a_cycle(api):
    patient = await new_patient(api, new_system(), "1")
    first = await new_task(api, None)
    second = await new_task(api, None, partOf=[{"reference": f"Task/{first}"}])
    cycle = {"resourceType": "Task", "id": first, "status": "requested", "intent": "order",
             "for": {"reference": f"Patient/{patient}"}, "partOf": [{"reference": f"Task/{second}"}]}
    assert (await api.put(f"Task/{first}", cycle)).status_code == 200
    bundle = await search(api, f"Patient?_id={patient}&_revinclude=Task:patient&_include:iterate=Task:part-of")
    assert sorted(ids(bundle, "include")) == sorted([first, second])


async def test_includes_the_gateway_resolves_apply_elements_too(api):
    patient = await new_patient(api, new_system(), "1", gender="female", birthDate="1950-01-01")
    task = await new_task(api, patient)
    bundle = await search(api, f"Task?_id={task}&_include=Task:patient&_elements=identifier")
    included = next(e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "include")
    assert included["id"] == patient and "identifier" in included and "birthDate" not in included
    assert any(tag["code"] == "SUBSETTED" for tag in included["meta"]["tag"])


@pytest.mark.parametrize("query", [
    "Patient?_revinclude=Task",  # no parameter
    "Patient?_revinclude=Task:no-such-parameter",
    "Patient?_revinclude=Task:status",  # not a reference
    "Patient?_revinclude:sideways=Task:patient",
    "Patient?_include:iterate=NotAType:patient",
    "Task?_include=Patient:organization",  # not the searched type, without :iterate
    "Patient?_revinclude=*",
])
async def test_malformed_includes_are_400(api, query):
    response = await api.get(query)
    assert response.status_code == 400, response.text
    assert outcome_code(response) in ("invalid", "not-supported")


# ----------------------------------------------------------------- merged searches: previous links


async def _requests_over_two_owners(api: Any, count: int) -> tuple[str, list[str]]:
    patient = await new_patient(api, new_system(), "1")
    made = [await new_request(api, patient, telemedicine=bool(i % 2), note=[{"text": f"#{i}"}]) for i in range(count)]
    return patient, made


async def _walk(api: Any, start: str, relation: str) -> list[dict[str, Any]]:
    pages = [await search(api, start)]
    while (following := link(pages[-1], relation)) is not None:
        pages.append(await search(api, following))
        assert len(pages) < 20
    return pages


@pytest.mark.parametrize("sort", ["", "&_sort=-_lastUpdated", "&_sort=status,-_lastUpdated"])
async def test_a_merged_search_pages_back_with_previous(api, sort):
    patient, made = await _requests_over_two_owners(api, 7)
    query = f"ServiceRequest?subject=Patient/{patient}&_count=2{sort}"
    whole = ids(await search(api, f"ServiceRequest?subject=Patient/{patient}&_count=100{sort}"))
    assert sorted(whole) == sorted(made)
    forward = await _walk(api, query, "next")
    assert link(forward[0], "previous") is None
    assert [i for page in forward for i in ids(page)] == whole
    backward = await _walk(api, link(forward[-2], "next"), "previous")
    assert [i for page in reversed(backward) for i in ids(page)] == whole
    assert all(page["total"] == 7 for page in forward + backward)
    # A page reached backwards pages forward again to the same rows.
    again = await search(api, link(backward[1], "next"))
    assert ids(again) == ids(forward[-1])


async def test_merged_previous_is_stable_while_data_change(api):
    patient, made = await _requests_over_two_owners(api, 6)
    query = f"ServiceRequest?subject=Patient/{patient}&_count=2"
    first = await search(api, query)
    second = await search(api, link(first, "next"))
    third = await search(api, link(second, "next"))
    assert ids(first) + ids(second) + ids(third) == made
    # Between fetches: a row of the first page is deleted and a new one (sorting last) arrives.
    assert (await api.delete(f"ServiceRequest/{made[0]}")).status_code in (200, 204)
    added = await new_request(api, patient, telemedicine=True)
    back = await search(api, link(third, "previous"))
    assert ids(back) == ids(second)  # the boundary is between rows, not a count of rows
    back_again = await search(api, link(back, "previous"))
    assert ids(back_again) == [made[1]]
    assert link(back_again, "previous") is None
    onward = await _walk(api, link(back, "next"), "next")
    assert [i for page in onward for i in ids(page)] == [*made[4:], added]


async def test_a_broken_merged_cursor_is_400(api):
    patient, _ = await _requests_over_two_owners(api, 3)
    page = await search(api, f"ServiceRequest?subject=Patient/{patient}&_count=1")
    cursor = link(page, "next").split("_merged=")[1]
    for bad in ("garbage!", "e30", cursor[:-6]):
        response = await api.get(f"ServiceRequest?subject=Patient/{patient}&_count=1&_merged={bad}")
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["resourceType"] == "OperationOutcome"


# -------------------------------------------------------------------------------- _elements paths


async def test_elements_paths_keep_the_named_sub_elements(api):
    system = new_system()
    obs = await new_observation(
        api, system, "1", subject={"reference": f"Patient/{await new_patient(api, system, 'p')}", "display": "王"},
        component=[{"code": {"text": "收缩压"}, "valueQuantity": {"value": 120.5, "unit": "mmHg"},
                    "interpretation": [{"text": "N"}]}],
        note=[{"text": "x"}])
    bundle = await search(api, f"Observation?identifier={system}|&_elements=identifier.value,subject.display,"
                               f"component.valueQuantity.value,Observation.note,Patient.name")
    resource = bundle["entry"][0]["resource"]
    assert resource["id"] == obs
    assert resource["identifier"] == [{"value": "1"}]
    assert resource["subject"] == {"display": "王"}
    # Inside a kept element its mandatory sub-elements stay (component.code).
    assert resource["component"] == [{"code": {"text": "收缩压"}, "valueQuantity": {"value": 120.5}}]
    assert resource["note"] == [{"text": "x"}] and resource["status"] == "final" and "code" in resource
    assert any(tag["code"] == "SUBSETTED" for tag in resource["meta"]["tag"])
    written = ('{"resourceType":"Observation","status":"final","code":{"text":"BP"},"identifier":[{"system":"'
               + system + '","value":"2"}],"component":[{"code":{"text":"x"},"valueQuantity":{"value":120.50}}]}')
    assert (await api.post("Observation", written.encode())).status_code == 201
    raw = (await api.get(f"Observation?identifier={system}|2&_elements=component.valueQuantity.value")).text
    assert '"valueQuantity":{"value":120.50}' in raw  # decimals as written


@pytest.mark.parametrize("elements", [".", "code..coding", "identifier.", "status.nothing", "Nope.status"])
async def test_odd_elements_paths_never_fail(api, elements):
    system = new_system()
    await new_observation(api, system, "1")
    bundle = await search(api, f"Observation?identifier={system}|&_elements={quote(elements)}")
    resource = bundle["entry"][0]["resource"]
    assert resource["status"] == "final" and "identifier" not in resource


# ----------------------------------------------------------------------- dates without a time zone


async def test_dates_without_a_zone_are_read_in_china_standard_time(api):
    system = new_system()
    # A stored date is the day as lived in the county: 2024-02-29T16:00Z to 2024-03-01T16:00Z.
    day = await new_observation(api, system, "1", effectiveDateTime="2024-03-01")
    scope = f"Observation?identifier={system}|1&date="
    assert ids(await search(api, scope + "2024-03-01")) == [day]
    assert ids(await search(api, scope + "2024-02-29")) == []
    assert ids(await search(api, scope + quote("le2024-02-29T16:00:00Z"))) == [day]
    assert ids(await search(api, scope + quote("le2024-02-29T15:59:59Z"))) == []
    assert ids(await search(api, scope + quote("lt2024-02-29T16:00:01Z"))) == [day]
    assert ids(await search(api, scope + quote("gt2024-03-01T15:59:58Z"))) == [day]
    assert ids(await search(api, scope + quote("ge2024-03-01T16:00:00Z"))) == []
    patient = await new_patient(api, system, "2", birthDate="2024-03")
    births = f"Patient?identifier={system}|2&birthdate="
    assert ids(await search(api, births + quote("le2024-02-29T16:00:00Z"))) == [patient]
    assert ids(await search(api, births + quote("le2024-02-29T15:59:59Z"))) == []
    assert ids(await search(api, births + quote("ge2024-03-31T15:59:59Z"))) == [patient]
    assert ids(await search(api, births + quote("ge2024-03-31T16:00:00Z"))) == []
    # A search dateTime without a zone is read the same way (FHIR requires one on a stored time).
    moment = await new_observation(api, system, "3", effectiveDateTime="2024-03-01T07:30:00+08:00")
    scope = f"Observation?identifier={system}|3&date="
    assert ids(await search(api, scope + "2024-03-01T07:30:00")) == [moment]
    assert ids(await search(api, scope + quote("2024-03-01T07:30:00Z"))) == []
    assert ids(await search(api, scope + "2024-03-01")) == [moment]


def test_the_time_zone_is_a_setting():
    from fhirkit.search import values
    from servicekit.settings import AllianceSettings

    assert AllianceSettings().time_zone == "+08:00"
    assert AllianceSettings(time_zone="Asia/Shanghai").time_zone == "Asia/Shanghai"
    with pytest.raises(ValueError):
        AllianceSettings(time_zone="Mars/Olympus")
    with pytest.raises(ValueError):
        AllianceSettings(time_zone="+25:00")
    previous = values.local_time_zone()
    try:
        values.set_local_time_zone("UTC")
        assert values.date_range("2024-03-01")[0] == values.date_range("2024-03-01T00:00:00Z")[0]
        values.set_local_time_zone("Asia/Shanghai")
        assert values.date_range("2024-03-01")[0] == values.date_range("2024-02-29T16:00:00Z")[0]
    finally:
        values.set_local_time_zone(previous)
    assert values.date_range("2024-03-01")[0] == values.date_range("2024-02-29T16:00:00Z")[0]


@pytest.mark.parametrize(("text", "low", "high"), [
    ("2024", "2023-12-31T16:00:00+00:00", "2024-12-31T16:00:00+00:00"),  # read at +08:00: a leap year
    ("2023-02", "2023-01-31T16:00:00+00:00", "2023-02-28T16:00:00+00:00"),
    ("2024-02", "2024-01-31T16:00:00+00:00", "2024-02-29T16:00:00+00:00"),
    ("2024-12-31", "2024-12-30T16:00:00+00:00", "2024-12-31T16:00:00+00:00"),
    ("2024-03-01T07:30", "2024-02-29T23:30:00+00:00", "2024-02-29T23:31:00+00:00"),
    ("2024-03-01T07:30:15Z", "2024-03-01T07:30:15+00:00", "2024-03-01T07:30:16+00:00"),
    ("2024-03-01T07:30:15-05:30", "2024-03-01T13:00:15+00:00", "2024-03-01T13:00:16+00:00"),
    ("2024-03-01T07:30:15.25+08:00", "2024-02-29T23:30:15.250000+00:00", "2024-02-29T23:30:15.260000+00:00"),
    ("2024-03-01T07:30:15.123456789Z", "2024-03-01T07:30:15.123456+00:00", "2024-03-01T07:30:15.123457+00:00"),
])
def test_a_date_covers_its_precision(text: str, low: str, high: str):
    """Its [low, high) as UTC instants."""
    from fhirkit.search import values

    def micros(instant: str) -> int:
        return values.to_micros(datetime.fromisoformat(instant))

    assert values.date_range(text) == (micros(low), micros(high) - 1)


def test_the_first_and_last_seconds_of_the_calendar_have_ranges():
    """Their ends lie outside what datetime can hold (before year 1 in UTC, after 9999)."""
    from fhirkit.search import values

    second = values.MICROS
    first = values.to_micros(datetime(1, 1, 1, tzinfo=UTC)) - 8 * 3600 * second
    assert values.date_range("0001-01-01T00:00:00+08:00") == (first, first + second - 1)
    last = values.to_micros(datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC))
    assert values.date_range("9999-12-31T23:59:59Z") == (last, last + second - 1)


@pytest.mark.parametrize("text", ["2023-02-29", "2024-13", "2024-00", "2024-04-31", "2024-01-01T24:00",
                                  "2024-01-01T10:60", "2024-01-01T10:00:60Z", "0000", "2024-1-01", "today"])
def test_an_impossible_date_has_no_range(text: str):
    from fhirkit.search import values

    assert values.date_range(text) is None


def test_a_named_zone_reads_each_end_at_its_own_offset():
    """New York's 2024-03-10 lasted 23 hours and 2024-11-03 lasted 25: the day's end is read at the
    offset in force then, not at the day's start."""
    from fhirkit.search import values

    previous = values.local_time_zone()
    try:
        values.set_local_time_zone("America/New_York")
        for day, hours, midnight in (("2024-03-10", 23, "-05:00"), ("2024-11-03", 25, "-04:00"),
                                     ("2024-07-04", 24, "-04:00")):
            low, high = values.date_range(day)
            assert (high + 1 - low) == hours * 3600 * values.MICROS
            assert low == values.date_range(f"{day}T00:00:00{midnight}")[0]
        low, high = values.date_range("2024-03-10T02:30")  # a minute the clocks skipped keeps the earlier offset
        assert low == values.date_range("2024-03-10T02:30:00-05:00")[0] and high - low == 60 * values.MICROS - 1
    finally:
        values.set_local_time_zone(previous)


def test_the_migration_recomputes_date_index_rows_read_as_utc(tmp_path: Path):
    """A database indexed by the code before this change (zone-less dates as UTC) is recomputed
    by `alliance migrate` (the fhirkit lineage's revision 0005_local_dates); a downgrade restores UTC."""
    import orjson
    import sqlalchemy as sa

    from fhirkit.search import values
    from fhirkit.store.indexing import index_rows
    from servicekit.migrations import FHIRKIT_LINEAGE, upgrade

    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, [FHIRKIT_LINEAGE], "0004")
    body = {"resourceType": "Patient", "id": "p1", "birthDate": "2024-03-01"}
    previous = values.local_time_zone()
    values.set_local_time_zone("UTC")
    try:
        utc_rows = index_rows(body)["date"]
    finally:
        values.set_local_time_zone(previous)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO fhir_resource (resource_type, resource_id, version_id, last_updated, "
                             "deleted, content) VALUES ('Patient', 'p1', 1, 0, 0, :c)"), {"c": orjson.dumps(body)})
        rid = conn.execute(sa.text("SELECT rid FROM fhir_resource")).scalar_one()
        for row in utc_rows:
            conn.execute(sa.text("INSERT INTO fhir_date_index (rid, resource_type, param, low, high) "
                                 "VALUES (:rid, :resource_type, :param, :low, :high)"), {"rid": rid, **row})

    def birthdate_low() -> int:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT low FROM fhir_date_index WHERE param = 'birthdate'")).scalar_one()

    assert birthdate_low() == values.date_range("2024-03-01T00:00:00Z")[0]
    upgrade(url, [FHIRKIT_LINEAGE])
    assert birthdate_low() == values.date_range("2024-02-29T16:00:00Z")[0]
    from alembic import command

    from servicekit.migrations import _config

    command.downgrade(_config(FHIRKIT_LINEAGE, url), "0004")
    assert birthdate_low() == values.date_range("2024-03-01T00:00:00Z")[0]
    assert values.local_time_zone() == previous  # the migration leaves the process's zone alone
    engine.dispose()


# --------------------------------------------------------------------------------- CapabilityStatement


async def test_metadata_describes_what_search_does(client):
    statement = (await client.get("/fhir/metadata")).json()
    rest = statement["rest"][0]
    patient = next(r for r in rest["resource"] if r["type"] == "Patient")
    assert {"Task:patient", "Observation:subject", "ServiceRequest:subject"} <= set(patient["searchRevInclude"])
    assert "Patient:general-practitioner" in patient["searchInclude"]
    for words in (":iterate", "_elements", "previous", "+08:00"):
        assert words in rest["documentation"], words

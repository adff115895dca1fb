"""FHIR search through the gateway (https://hl7.org/fhir/R4/search.html).

Each test creates its own data under a fresh identifier system and always narrows its searches by
that system, so the session's other data never changes an expected result.
"""

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import pytest

from tests.support import outcome_code

UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"
BASE = "http://127.0.0.1:8080/fhir"


def new_system() -> str:
    return f"urn:test:{uuid.uuid4().hex}"


def created_id(response: Any) -> str:
    assert response.status_code == 201, response.text
    return response.headers["location"].split("/")[-3]


async def search(api: Any, query: str, **kwargs: Any) -> dict[str, Any]:
    response = await api.get(query, **kwargs)
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    return bundle


def ids(bundle: dict[str, Any], mode: str = "match") -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode", "match") == mode]


async def found(api: Any, query: str) -> set[str]:
    return set(ids(await search(api, query)))


async def new_patient(api: Any, system: str, value: str, **extra: Any) -> str:
    body = {"resourceType": "Patient", "identifier": [{"system": system, "value": value}], **extra}
    return created_id(await api.post("Patient", body))


async def new_observation(api: Any, system: str, value: str, **extra: Any) -> str:
    body = {
        "resourceType": "Observation",
        "identifier": [{"system": system, "value": value}],
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "8867-4"}]},
        **extra,
    }
    return created_id(await api.post("Observation", body))


def link(bundle: dict[str, Any], relation: str) -> str | None:
    url = next((item["url"] for item in bundle.get("link", []) if item["relation"] == relation), None)
    return url.split("/fhir/", 1)[1] if url else None


# ---------------------------------------------------------------------------------------- token


async def test_token_system_code_forms(api):
    system = new_system()
    with_loinc = await new_observation(api, system, "1", code={"coding": [{"system": LOINC, "code": "X-1"}]})
    other_system = await new_observation(api, system, "2", code={"coding": [{"system": "urn:other", "code": "X-1"}]})
    no_system = await new_observation(api, system, "3", code={"coding": [{"code": "X-1"}]})
    scope = f"Observation?identifier={system}|"
    assert await found(api, f"{scope}&code={LOINC}|X-1") == {with_loinc}
    assert await found(api, f"{scope}&code=|X-1") == {no_system}
    assert await found(api, f"{scope}&code=X-1") == {with_loinc, other_system, no_system}
    assert await found(api, f"{scope}&code=urn:other|X-1,{LOINC}|X-1") == {with_loinc, other_system}
    assert await found(api, f"Observation?identifier={system}|2") == {other_system}
    assert await found(api, f"{scope}&code={LOINC}|X-2") == set()


async def test_token_not_and_missing(api):
    system = new_system()
    final = await new_observation(api, system, "1")
    amended = await new_observation(api, system, "2", status="amended",
                                    category=[{"coding": [{"code": "laboratory"}]}])
    scope = f"Observation?identifier={system}|"
    assert await found(api, f"{scope}&status:not=final") == {amended}
    # `:not` also matches resources that have no value at all.
    assert await found(api, f"{scope}&category:not=laboratory") == {final}
    assert await found(api, f"{scope}&category:missing=true") == {final}
    assert await found(api, f"{scope}&category:missing=false") == {amended}


# ------------------------------------------------------------------------------------ reference


async def test_reference_forms(api):
    system = new_system()
    mine, other = await new_patient(api, system, "p1"), await new_patient(api, system, "p2")
    obs = await new_observation(api, system, "1", subject={"reference": f"Patient/{mine}"})
    await new_observation(api, system, "2", subject={"reference": f"Patient/{other}"})
    scope = f"Observation?identifier={system}|"
    for value in (f"Patient/{mine}", mine, f"{BASE}/Patient/{mine}"):
        assert await found(api, f"{scope}&subject={quote(value, safe='/')}") == {obs}, value
    assert await found(api, f"{scope}&patient={mine}") == {obs}
    assert await found(api, f"{scope}&subject:Patient={mine}") == {obs}
    assert await found(api, f"{scope}&subject=Device/{mine}") == set()


async def test_reference_below_and_above_walk_the_partof_chain(api):
    system = new_system()

    async def org(value: str, parent: str | None) -> str:
        body: dict[str, Any] = {"resourceType": "Organization", "identifier": [{"system": system, "value": value}],
                                "name": value}
        if parent:
            body["partOf"] = {"reference": f"Organization/{parent}"}
        return created_id(await api.post("Organization", body))

    province = await org("province", None)
    county = await org("county", province)
    township = await org("township", county)
    village = await org("village", township)
    other_county = await org("other-county", province)
    scope = f"Organization?identifier={system}|"
    assert await found(api, f"{scope}&partof:below=Organization/{county}") == {township, village}
    assert await found(api, f"{scope}&partof:below={province}") == {county, township, village, other_county}
    assert await found(api, f"{scope}&partof:below=Organization/{village}") == set()
    assert await found(api, f"{scope}&partof={county}") == {township}
    # `:above`: every organization the given one is under, at any depth.
    assert await found(api, f"{scope}&partof:above=Organization/{village}") == {township, county, province}
    assert await found(api, f"{scope}&partof:above={county}") == {province}
    assert await found(api, f"{scope}&partof:above=Organization/{province}") == set()
    assert await found(api, f"{scope}&partof:below=Organization/{county},Organization/{other_county}") == {
        township, village
    }
    wrong_type = await api.get(f"{scope}&partof:below=Location/{county}")
    assert wrong_type.status_code == 400


async def test_reference_below_ends_on_a_cycle_in_the_data(api):
    system = new_system()
    a, b = (f"loc-{uuid.uuid4().hex[:10]}" for _ in range(2))

    def location(own: str, parent: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"resourceType": "Location", "id": own, "identifier": [{"system": system, "value": own}]}
        return {**body, "partOf": {"reference": f"Location/{parent}"}} if parent else body

    for own, parent in ((a, None), (b, a), (a, b)):
        assert (await api.put(f"Location/{own}", location(own, parent))).status_code in (200, 201)
    assert await found(api, f"Location?identifier={system}|&partof:below=Location/{a}") == {a, b}
    assert await found(api, f"Location?identifier={system}|&partof:above=Location/{a}") == {a, b}


# ----------------------------------------------------------------------------------------- date


async def test_date_prefixes(api):
    system = new_system()
    day10 = await new_observation(api, system, "10", effectiveDateTime="2021-01-10")
    day15 = await new_observation(api, system, "15", effectiveDateTime="2021-01-15T10:00:00+08:00")
    day20 = await new_observation(api, system, "20", effectiveDateTime="2021-01-20")
    period = await new_observation(api, system, "p", effectivePeriod={"start": "2021-01-14", "end": "2021-01-16"})
    scope = f"Observation?identifier={system}|&date="
    expected = {
        "2021-01-15": {day15},
        "eq2021-01-15": {day15},
        "ne2021-01-15": {day10, day20, period},
        "gt2021-01-15": {day20, period},
        "lt2021-01-15": {day10, period},
        "ge2021-01-15": {day15, day20, period},
        "le2021-01-15": {day10, day15, period},
        "sa2021-01-15": {day20},
        "eb2021-01-15": {day10},
        "2021-01": {day10, day15, day20, period},
        "eq2021": {day10, day15, day20, period},
        "gt2021-01-14T23:59:59Z": {day15, day20, period},
    }
    for value, wanted in expected.items():
        assert await found(api, scope + quote(value)) == wanted, value
    assert await found(api, f"Observation?identifier={system}|&date=ge2021-01-12&date=le2021-01-18") == {day15, period}


async def test_date_ap_is_ten_percent_of_the_gap_to_now(api):
    system = new_system()
    now = datetime.now(UTC)
    long_ago = await new_observation(api, system, "old", effectiveDateTime="2000-01-01")
    recent = (now - timedelta(days=10)).strftime("%Y-%m-%d")
    yesterday = await new_observation(api, system, "recent", effectiveDateTime=recent)
    scope = f"Observation?identifier={system}|&date="
    # 2000 is ~26 years ago: 10% is more than two years either side.
    assert await found(api, scope + "ap2001-06-01") == {long_ago}
    assert await found(api, scope + "ap1990-01-01") == set()
    # Ten days ago: 10% of the gap is about a day.
    near = (now - timedelta(days=11)).strftime("%Y-%m-%d")
    far = (now - timedelta(days=20)).strftime("%Y-%m-%d")
    assert await found(api, scope + "ap" + near) == {yesterday}
    assert await found(api, scope + "ap" + far) == set()


# --------------------------------------------------------------------------------------- string


async def test_string_default_exact_contains(api):
    system = new_system()
    zhang = await new_patient(api, system, "1", name=[{"family": "Zhang", "given": ["Wei"]}])
    zhangsan = await new_patient(api, system, "2", name=[{"family": "Zhangsan"}])
    muller = await new_patient(api, system, "3", name=[{"family": "Müller"}])
    chinese = await new_patient(api, system, "4", name=[{"family": "欧阳", "given": ["娜娜"]}])
    scope = f"Patient?identifier={system}|"
    assert await found(api, f"{scope}&family=zha") == {zhang, zhangsan}  # starts-with, case-insensitive
    assert await found(api, f"{scope}&family=muller") == {muller}  # accents ignored
    assert await found(api, f"{scope}&family:exact=Zhang") == {zhang}
    assert await found(api, f"{scope}&family:exact=zhang") == set()
    assert await found(api, f"{scope}&family:contains=ngsa") == {zhangsan}
    assert await found(api, f"{scope}&family:contains=LLE") == {muller}
    assert await found(api, f"{scope}&name=欧阳娜娜") == {chinese}
    assert await found(api, f"{scope}&given=wei") == {zhang}
    assert await found(api, f"{scope}&name=wei,欧阳") == {zhang, chinese}


# ------------------------------------------------------------------------------------- quantity


async def test_quantity_prefixes_and_units(api):
    system = new_system()
    small = await new_observation(api, system, "1", valueQuantity={"value": 5.4, "unit": "mg", "system": UCUM, "code": "mg"})
    large = await new_observation(api, system, "2", valueQuantity={"value": 100, "unit": "mg", "system": UCUM, "code": "mg"})
    grams = await new_observation(api, system, "3", valueQuantity={"value": 6, "unit": "g", "system": UCUM, "code": "g"})
    scope = f"Observation?identifier={system}|&value-quantity="
    expected = {
        f"5.4|{UCUM}|mg": {small},
        "5.4": {small},
        "5.4||mg": {small},
        "5.4||g": set(),
        "gt50||mg": {large},
        "lt6": {small},
        "le6": {small, grams},
        "ge6": {large, grams},
        f"ne5.4|{UCUM}|mg": {large},
        "ap95||mg": {large},
        "ap80||mg": set(),
        f"lt10|{UCUM}|g": {grams},
    }
    for value, wanted in expected.items():
        assert await found(api, scope + quote(value, safe="|")) == wanted, value


# ------------------------------------------------------------------------------ chains and _has


async def test_chained_search_within_a_service(api):
    system = new_system()
    doctor = created_id(await api.post("Practitioner", {"resourceType": "Practitioner",
                                                        "name": [{"family": f"Chain{system[-8:]}"}]}))
    treated = await new_patient(api, system, "1", generalPractitioner=[{"reference": f"Practitioner/{doctor}"}])
    await new_patient(api, system, "2")
    scope = f"Patient?identifier={system}|"
    family = f"Chain{system[-8:]}"
    assert await found(api, f"{scope}&general-practitioner:Practitioner.name={family}") == {treated}
    assert await found(api, f"{scope}&general-practitioner.family={family}") == {treated}
    assert await found(api, f"{scope}&general-practitioner:Practitioner.name=nobody-{system[-8:]}") == set()


async def test_chain_or_has_across_services_is_refused_not_silently_empty(api):
    system = new_system()
    patient = await new_patient(api, system, "1", name=[{"family": "Across"}])
    await new_observation(api, system, "1", subject={"reference": f"Patient/{patient}"})
    chained = await api.get(f"Observation?identifier={system}|&subject:Patient.name=Across")
    assert chained.status_code == 400 and outcome_code(chained) == "not-supported"
    assert "Patient" in chained.json()["issue"][0]["diagnostics"]
    has = await api.get(f"Patient?identifier={system}|&_has:Observation:patient:code=8867-4")
    assert has.status_code == 400 and outcome_code(has) == "not-supported"


async def test_has_reverse_chain(api):
    system = new_system()
    surgeon = created_id(await api.post("Practitioner", {"resourceType": "Practitioner",
                                                         "identifier": [{"system": system, "value": "1"}]}))
    nurse = created_id(await api.post("Practitioner", {"resourceType": "Practitioner",
                                                       "identifier": [{"system": system, "value": "2"}]}))
    for who, role in ((surgeon, "surgeon"), (nurse, "nurse")):
        await api.post("PractitionerRole", {
            "resourceType": "PractitionerRole", "practitioner": {"reference": f"Practitioner/{who}"},
            "code": [{"coding": [{"system": system, "code": role}]}],
        })
    scope = f"Practitioner?identifier={system}|"
    assert await found(api, f"{scope}&_has:PractitionerRole:practitioner:role={system}|surgeon") == {surgeon}
    assert await found(api, f"{scope}&_has:PractitionerRole:practitioner:role={system}|cook") == set()


# ------------------------------------------------------------------------------------- includes


async def _org_tree(api: Any, system: str) -> tuple[str, str, str]:
    root = created_id(await api.post("Organization", {"resourceType": "Organization", "name": "root",
                                                      "identifier": [{"system": system, "value": "root"}]}))
    mid = created_id(await api.post("Organization", {"resourceType": "Organization", "name": "mid",
                                                     "identifier": [{"system": system, "value": "mid"}],
                                                     "partOf": {"reference": f"Organization/{root}"}}))
    leaf = created_id(await api.post("Organization", {"resourceType": "Organization", "name": "leaf",
                                                      "identifier": [{"system": system, "value": "leaf"}],
                                                      "partOf": {"reference": f"Organization/{mid}"}}))
    return root, mid, leaf


async def test_include_and_revinclude_with_iterate(api):
    system = new_system()
    root, mid, leaf = await _org_tree(api, system)
    once = await search(api, f"Organization?_id={leaf}&_include=Organization:partof")
    assert ids(once) == [leaf] and ids(once, "include") == [mid]
    assert once["total"] == 1  # includes are not counted
    iterated = await search(api, f"Organization?_id={leaf}&_include:iterate=Organization:partof")
    assert ids(iterated) == [leaf] and set(ids(iterated, "include")) == {mid, root}
    reverse = await search(api, f"Organization?_id={root}&_revinclude=Organization:partof")
    assert ids(reverse) == [root] and ids(reverse, "include") == [mid]
    reverse_all = await search(api, f"Organization?_id={root}&_revinclude:iterate=Organization:partof")
    assert set(ids(reverse_all, "include")) == {mid, leaf}
    doctor = created_id(await api.post("Practitioner", {"resourceType": "Practitioner"}))
    role = created_id(await api.post("PractitionerRole", {
        "resourceType": "PractitionerRole", "practitioner": {"reference": f"Practitioner/{doctor}"},
        "organization": {"reference": f"Organization/{leaf}"},
    }))
    bundle = await search(api, f"PractitionerRole?_id={role}&_include=PractitionerRole:practitioner"
                               f"&_include=PractitionerRole:organization&_include:iterate=Organization:partof")
    assert ids(bundle) == [role] and set(ids(bundle, "include")) == {doctor, leaf, mid, root}


async def test_include_of_a_type_held_elsewhere_is_read_there(api):
    system = new_system()
    patient = await new_patient(api, system, "1")
    obs = await new_observation(api, system, "1", subject={"reference": f"Patient/{patient}"})
    bundle = await search(api, f"Observation?identifier={system}|&_include=Observation:subject")
    assert ids(bundle) == [obs] and ids(bundle, "include") == [patient]  # the directory's, read by the gateway
    assert not [e for e in bundle["entry"] if e["search"]["mode"] == "outcome"]


# ----------------------------------------------------------------------------------------- sort


async def test_sort_asc_desc_multiple_keys(api):
    system = new_system()
    a = await new_patient(api, system, "a", birthDate="1990-01-01", name=[{"family": "Bai"}])
    b = await new_patient(api, system, "b", birthDate="1980-06-01", name=[{"family": "Chen"}])
    c = await new_patient(api, system, "c", birthDate="1985-03-01", name=[{"family": "Bai"}])
    d = await new_patient(api, system, "d", name=[{"family": "Ai"}])  # no birth date: last either way
    scope = f"Patient?identifier={system}|&_sort="
    assert ids(await search(api, scope + "birthdate")) == [b, c, a, d]
    assert ids(await search(api, scope + "-birthdate")) == [a, c, b, d]
    assert ids(await search(api, scope + "family,-birthdate")) == [d, a, c, b]
    assert ids(await search(api, scope + "-family,birthdate")) == [b, c, a, d]
    assert ids(await search(api, scope + "-_lastUpdated")) == [d, c, b, a]
    assert ids(await search(api, scope + "_id")) == sorted([a, b, c, d])
    bad = await api.get(scope + "nonsense")
    assert bad.status_code == 400


# --------------------------------------------------------------------------------------- paging


async def test_paging_links_are_stable_while_data_changes(api):
    system = new_system()
    original = [await new_patient(api, system, f"{i:02d}") for i in range(9)]
    page = await search(api, f"Patient?identifier={system}|&_count=3&_sort=identifier")
    assert page["total"] == 9 and link(page, "previous") is None
    seen = ids(page)
    # Between page fetches: a row not yet seen is deleted, one already seen is deleted, and new
    # rows are created (sorting before and after the cursor).
    deleted_ahead, deleted_behind = original[5], original[0]
    await api.delete(f"Patient/{deleted_ahead}")
    await api.delete(f"Patient/{deleted_behind}")
    added = [await new_patient(api, system, v) for v in ("00a", "99")]
    pages = [page]
    while (next_query := link(pages[-1], "next")) is not None:
        pages.append(await search(api, next_query))
        seen += ids(pages[-1])
    assert len(seen) == len(set(seen)), "a row was repeated"
    present_throughout = set(original) - {deleted_ahead, deleted_behind}
    assert present_throughout <= set(seen), "a row was skipped"
    assert deleted_ahead not in seen and added[1] in seen
    back = await search(api, link(pages[1], "previous"))
    # The page before the second one, as the data are now: 00 is gone and 00a arrived.
    assert ids(back) == [added[0], *original[1:3]]
    assert all(len(ids(p)) <= 3 for p in pages)


@pytest.mark.parametrize("sort", ["birthdate", "-birthdate", "family,-birthdate", "-_lastUpdated"])
async def test_paging_forward_and_back_gives_the_sorted_order(api, sort):
    system = new_system()
    births = ["1990-01-01", None, "1980-05-05", "1990-01-01", None, "1975-12-31", "1980-05-05"]
    for index, birth in enumerate(births):
        extra: dict[str, Any] = {"name": [{"family": "AB"[index % 2]}]}
        if birth:
            extra["birthDate"] = birth
        await new_patient(api, system, str(index), **extra)
    query = f"Patient?identifier={system}|&_sort={sort}"
    whole = ids(await search(api, f"{query}&_count=100"))
    assert len(whole) == len(births)
    pages = [await search(api, f"{query}&_count=2")]
    while (next_query := link(pages[-1], "next")) is not None:
        pages.append(await search(api, next_query))
    assert [i for page in pages for i in ids(page)] == whole
    backwards = [pages[-1]]
    while (previous_query := link(backwards[-1], "previous")) is not None:
        backwards.append(await search(api, previous_query))
    assert [i for page in reversed(backwards) for i in ids(page)] == whole


async def test_total_and_summary_count(api):
    system = new_system()
    for value in ("1", "2", "3"):
        await new_patient(api, system, value)
    accurate = await search(api, f"Patient?identifier={system}|&_total=accurate&_count=1")
    assert accurate["total"] == 3 and len(accurate["entry"]) == 1
    none = await search(api, f"Patient?identifier={system}|&_total=none&_count=1")
    assert "total" not in none and len(none["entry"]) == 1
    counted = await search(api, f"Patient?identifier={system}|&_summary=count")
    assert counted["total"] == 3 and "entry" not in counted


async def test_elements_and_summary(api):
    system = new_system()
    obs = await new_observation(api, system, "1", effectiveDateTime="2022-02-02",
                                valueQuantity={"value": 1, "unit": "mg"}, note=[{"text": "bulky"}],
                                text={"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">x</div>"})
    bundle = await search(api, f"Observation?identifier={system}|&_elements=effective,identifier")
    (entry,) = bundle["entry"]
    resource = entry["resource"]
    assert resource["id"] == obs and resource["effectiveDateTime"] == "2022-02-02"
    assert "valueQuantity" not in resource and "note" not in resource and "text" not in resource
    # Mandatory elements stay so that the result is still a valid resource.
    assert resource["status"] == "final" and resource["code"]["coding"][0]["code"] == "8867-4"
    assert any(tag.get("code") == "SUBSETTED" for tag in resource["meta"]["tag"])
    summary = (await search(api, f"Observation?identifier={system}|&_summary=true"))["entry"][0]["resource"]
    assert "note" not in summary and "text" not in summary and summary["valueQuantity"]["value"] == 1
    data = (await search(api, f"Observation?identifier={system}|&_summary=data"))["entry"][0]["resource"]
    assert "text" not in data and data["note"] == [{"text": "bulky"}]
    # A read is never subsetted by a search.
    assert "note" in (await api.get(f"Observation/{obs}")).json()


async def test_id_and_last_updated(api):
    system = new_system()
    first = await new_patient(api, system, "1")
    stamp = (await api.get(f"Patient/{first}")).json()["meta"]["lastUpdated"]
    second = await new_patient(api, system, "2")
    third = await new_patient(api, system, "3")
    assert await found(api, f"Patient?_id={first},{third}") == {first, third}
    scope = f"Patient?identifier={system}|&_lastUpdated="
    assert await found(api, scope + quote(f"gt{stamp}")) == {second, third}
    assert await found(api, scope + quote(f"le{stamp}")) == {first}


async def test_meta_parameters(api):
    system = new_system()
    tagged = await new_patient(api, system, "1", meta={"tag": [{"system": system, "code": "vip"}],
                                                       "profile": ["http://example.org/StructureDefinition/cn-patient"],
                                                       "security": [{"system": system, "code": "R"}],
                                                       "source": "http://his.example.org"})
    plain = await new_patient(api, system, "2")
    scope = f"Patient?identifier={system}|"
    assert await found(api, f"{scope}&_tag={system}|vip") == {tagged}
    assert await found(api, f"{scope}&_tag:not={system}|vip") == {plain}
    assert await found(api, f"{scope}&_profile=http://example.org/StructureDefinition/cn-patient") == {tagged}
    assert await found(api, f"{scope}&_security={system}|R") == {tagged}
    assert await found(api, f"{scope}&_source=http://his.example.org") == {tagged}


async def test_search_via_post(api):
    system = new_system()
    pid = await new_patient(api, system, "1", name=[{"family": "Post"}])
    await new_patient(api, system, "2", name=[{"family": "Other"}])
    response = await api.post(
        "Patient/_search", f"identifier={quote(system)}|&family=post".encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200, response.text
    assert ids(response.json()) == [pid]
    mixed = await api.post(f"Patient/_search?identifier={quote(system)}|", b"family=other",
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert mixed.status_code == 200 and len(ids(mixed.json())) == 1


# ------------------------------------------------------------------- parameters the indexer missed


async def test_genetics_extension_parameters(api):
    system = new_system()
    gene = "http://hl7.org/fhir/StructureDefinition/observation-geneticsGene"
    variant = "http://hl7.org/fhir/StructureDefinition/observation-geneticsDnaVariant"
    obs = await new_observation(api, system, "1", extension=[
        {"url": gene, "valueCodeableConcept": {"coding": [{"system": "http://www.genenames.org", "code": "3236"}]}},
        {"url": variant, "valueString": "NG_007726.3:g.146252T>G"},
    ])
    scope = f"Observation?identifier={system}|"
    assert await found(api, f"{scope}&gene-identifier=http://www.genenames.org|3236") == {obs}
    assert await found(api, f"{scope}&dna-variant={quote('NG_007726.3:g.146252T>G')}") == {obs}
    assert await found(api, f"{scope}&gene-identifier=9999") == set()


async def test_deceased_is_absent_for_patients_without_it(api):
    system = new_system()
    alive_unknown = await new_patient(api, system, "1")
    alive = await new_patient(api, system, "2", deceasedBoolean=False)
    dead = await new_patient(api, system, "3", deceasedBoolean=True)
    dead_on = await new_patient(api, system, "4", deceasedDateTime="2020-02-02")
    scope = f"Patient?identifier={system}|&deceased"
    assert await found(api, scope + "=true") == {dead, dead_on}
    assert await found(api, scope + "=false") == {alive}
    assert await found(api, scope + ":missing=true") == {alive_unknown}
    assert await found(api, scope + ":not=true") == {alive_unknown, alive}


@pytest.mark.parametrize("query", ["birthdate=2020-13-01", "_count=many", "family:fuzzy=x", "gender:exact=male"])
async def test_bad_search_values_are_400(api, query):
    response = await api.get(f"Patient?{query}")
    assert response.status_code == 400
    assert outcome_code(response) in ("invalid", "not-supported")

"""Searches of simple filters run a statement built once per shape (fhirkit.store.query.template_key)
with the values bound. Shapes must never be mixed up: another value, another caller, a missing or
any system, another prefix or modifier each get what they ask for."""

from types import SimpleNamespace
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import text

from fhirkit.access import AccessPolicy
from fhirkit.search.request import parse_search
from fhirkit.store import query
from fhirkit.store.repository import Repository, StoreConfig
from servicekit.db import Database

STORE = StoreConfig(resource_types=frozenset({"Observation", "Patient"}),
                    access=AccessPolicy(public_types=frozenset({"Patient"})))
LOINC = "http://loinc.org"
LAB_A, LAB_B = "Organization/lab-a", "Organization/lab-b"


def observation(key: str, patient: str, code: str, *, system: str | None = LOINC, day: str = "2026-11-20",
                value: float = 5.0) -> dict[str, Any]:
    coding = {"code": code, **({"system": system} if system else {})}
    return {"resourceType": "Observation", "id": key, "status": "final", "code": {"coding": [coding]},
            "subject": {"reference": f"Patient/{patient}"}, "effectiveDateTime": f"{day}T08:00:00+08:00",
            "valueQuantity": {"value": value, "unit": "mmol/L", "system": "http://unitsofmeasure.org",
                              "code": "mmol/L"}}


@pytest_asyncio.fixture
async def seeded(database: Database) -> Database:
    """Two patients; lab A's results of both, lab B's of one."""
    async with database.transaction(write=True) as conn:
        for patient in ("p1", "p2"):
            await Repository(conn, STORE).update("Patient", patient, {"resourceType": "Patient", "id": patient})
        for owner, bodies in ((LAB_A, [observation("a1", "p1", "2345-7"), observation("a2", "p2", "2345-7"),
                                        observation("a3", "p1", "718-7", day="2026-11-22", value=9),
                                        observation("a4", "p1", "2345-7", system=None)]),
                              (LAB_B, [observation("b1", "p1", "2345-7")])):
            for body in bodies:
                await Repository(conn, STORE, owner=owner).update("Observation", body["id"], body)
    return database


async def ids(database: Database, caller: str, *params: tuple[str, str]) -> list[str]:
    request = parse_search("Observation", list(params))
    async with database.transaction(write=False) as conn:
        repo = Repository(conn, STORE, caller=SimpleNamespace(organization=caller, roles=(), level="county"))
        page = await repo.search(request)
    return sorted(m.resource_id for m in page.matches)


async def test_one_shape_with_other_values_and_other_callers(seeded: Database) -> None:
    assert query.template_key(parse_search("Observation", [("subject", "Patient/p1")])) is not None
    assert await ids(seeded, LAB_A, ("subject", "Patient/p1"), ("code", f"{LOINC}|2345-7")) == ["a1"]
    assert await ids(seeded, LAB_A, ("subject", "Patient/p2"), ("code", f"{LOINC}|2345-7")) == ["a2"]
    assert await ids(seeded, LAB_A, ("subject", "Patient/p1"), ("code", f"{LOINC}|718-7")) == ["a3"]
    assert await ids(seeded, LAB_B, ("subject", "Patient/p1"), ("code", f"{LOINC}|2345-7")) == ["b1"]
    assert await ids(seeded, LAB_A, ("subject", "Patient/p1"), ("code", f"{LOINC}|2345-7")) == ["a1"]


async def test_a_missing_or_any_system_and_several_values_are_shapes_of_their_own(seeded: Database) -> None:
    assert await ids(seeded, LAB_A, ("code", "|2345-7")) == ["a4"]  # no system
    assert await ids(seeded, LAB_A, ("code", "2345-7")) == ["a1", "a2", "a4"]  # any system
    assert await ids(seeded, LAB_A, ("code", f"{LOINC}|2345-7")) == ["a1", "a2"]
    assert await ids(seeded, LAB_A, ("code", f"{LOINC}|2345-7,{LOINC}|718-7")) == ["a1", "a2", "a3"]
    assert await ids(seeded, LAB_A, ("code:not", f"{LOINC}|2345-7")) == ["a3", "a4"]


async def test_prefixes_and_quantities(seeded: Database) -> None:
    assert await ids(seeded, LAB_A, ("date", "ge2026-11-21")) == ["a3"]
    assert await ids(seeded, LAB_A, ("date", "lt2026-11-21")) == ["a1", "a2", "a4"]
    assert await ids(seeded, LAB_A, ("date", "2026-11-22")) == ["a3"]
    assert await ids(seeded, LAB_A, ("value-quantity", "gt6")) == ["a3"]
    assert await ids(seeded, LAB_A, ("value-quantity", "5|http://unitsofmeasure.org|mmol/L")) == ["a1", "a2", "a4"]
    assert await ids(seeded, LAB_A, ("value-quantity", "le5")) == ["a1", "a2", "a4"]


async def test_filters_joined_on_their_index_rows_keep_apart_each_filters_own_conditions(seeded: Database) -> None:
    """Two or more filters that keep index rows are one semi-join over aliases of their tables
    (query._joined_clause): two token filters must not share an alias, `:not` and per-search
    filters (`_id`, `ap`) stay conditions of their own."""
    both = [("subject", "Patient/p1"), ("code", f"{LOINC}|2345-7")]
    assert await ids(seeded, LAB_A, *both, ("status", "final")) == ["a1"]
    assert await ids(seeded, LAB_A, *both, ("status", "amended")) == []
    assert await ids(seeded, LAB_A, ("code", "2345-7"), ("status", "final"), ("value-quantity", "le5")) == [
        "a1", "a2", "a4"]
    assert await ids(seeded, LAB_A, ("code", "2345-7"), ("code", f"{LOINC}|2345-7")) == ["a1", "a2"]  # AND
    assert await ids(seeded, LAB_A, ("subject", "Patient/p1"), ("code:not", f"{LOINC}|2345-7"),
                     ("date", "ge2026-11-21")) == ["a3"]
    assert await ids(seeded, LAB_A, *both, ("_id", "a1,a2")) == ["a1"]  # built per search
    assert await ids(seeded, LAB_A, ("subject", "Patient/p1"), ("date", "ap2026-11-22")) == ["a3"]


def test_what_is_built_per_search_has_no_template() -> None:
    for params in ([("subject:Patient.name", "x")], [("_id", "a1")],
                   [("date", "ap2026-11-20")], [("code:missing", "true")], [("_has:Observation:subject:code", "x")]):
        assert query.template_key(parse_search("Patient" if "_has" in params[0][0] else "Observation", params)) is None
    paged = parse_search("Observation", [("code", "x")])
    paged.cursor = "abc"
    assert query.template_key(paged) is None


async def test_searches_are_planned_for_their_values_while_other_statements_keep_their_plans(
    seeded: Database,
) -> None:
    """psycopg prepares a statement after five runs, and a prepared search may get a generic plan
    that cannot tell a patient from a lab code. Searches are never prepared; a read by id, run as
    often on the same connection, is (its plan is kept)."""
    if seeded.dialect != "postgresql":
        pytest.skip("SQLite plans every statement for its values")
    prepared = text("SELECT statement FROM pg_prepared_statements WHERE NOT from_sql")
    async with seeded.transaction(write=False) as conn:
        repo = Repository(conn, STORE, caller=SimpleNamespace(organization=LAB_A, roles=(), level="county"))
        for _ in range(8):
            page = await repo.search(parse_search("Observation", [("subject", "Patient/p1"),
                                                                  ("code", f"{LOINC}|2345-7")]))
            assert [m.resource_id for m in page.matches] == ["a1"]
        for _ in range(8):
            await repo.read("Observation", "a1")
        statements = [row[0] for row in await conn.execute(prepared)]
    assert not [s for s in statements if "fhir_token_index" in s]
    assert [s for s in statements if "fhir_resource" in s]

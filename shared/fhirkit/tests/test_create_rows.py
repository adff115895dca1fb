"""A created resource's rows: the resource row, its first history row and its index rows (on
PostgreSQL written by one statement), and what happens when two transactions create one id."""

import asyncio
from collections.abc import Awaitable, Callable

from sqlalchemy import select

from fhirkit.errors import VersionConflict
from fhirkit.search.request import parse_search
from fhirkit.store.repository import Repository, StoreConfig
from fhirkit.store.tables import resource, resource_history
from servicekit.db import Database

Counts = Callable[[], Awaitable[dict[str, int]]]  # the row_counts fixture (conftest.py)

STORE = StoreConfig(resource_types=frozenset({"Observation", "Patient"}))
OBSERVATION = {
    "resourceType": "Observation", "id": "glucose-1", "status": "final",
    "identifier": [{"system": "http://lis.example/obs", "value": "A-1"}],
    "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7", "display": "葡萄糖"}]},
    "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2026-11-20T08:00:00+08:00",
    "valueQuantity": {"value": 5, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"},
}


async def _with_patient(database: Database) -> None:
    async with database.transaction(write=True) as conn:
        await Repository(conn, STORE).update("Patient", "p1", {"resourceType": "Patient", "id": "p1"})


async def test_a_created_resource_is_found_by_every_kind_of_parameter(database: Database) -> None:
    await _with_patient(database)
    async with database.transaction(write=True) as conn:
        await Repository(conn, STORE).update("Observation", "glucose-1", OBSERVATION)
    async with database.transaction(write=False) as conn:
        repo = Repository(conn, STORE)
        for name, value in [("code", "http://loinc.org|2345-7"), ("subject", "Patient/p1"), ("date", "2026-11-20"),
                            ("value-quantity", "5|http://unitsofmeasure.org|mmol/L"), ("identifier", "A-1"),
                            ("value-quantity", "gt4.5")]:
            page = await repo.search(parse_search("Observation", [(name, value)]))
            assert [m.resource_id for m in page.matches] == ["glucose-1"], (name, value)
        history = (await conn.execute(select(resource_history.c.method, resource_history.c.version_id,
                                             resource_history.c.rid, resource_history.c.content)
                                      .where(resource_history.c.resource_type == "Observation"))).one()
        stored = (await conn.execute(select(resource.c.rid, resource.c.content)
                                     .where(resource.c.resource_type == "Observation"))).one()
    assert (history.method, history.version_id) == ("PUT", 1)
    assert (history.rid, history.content) == (stored.rid, stored.content)


async def test_two_transactions_creating_one_id_leave_one_resource_and_one_set_of_rows(
    database: Database, row_counts: Counts,
) -> None:
    """The second waits for the first, then finds the id taken: 409, nothing of its own written."""
    await _with_patient(database)
    async with database.transaction(write=True) as conn:
        await Repository(conn, STORE).update("Observation", "glucose-1", OBSERVATION)
    alone = await row_counts()
    async with database.transaction(write=True) as conn:
        await Repository(conn, STORE).delete("Observation", "glucose-1")  # so the next row is a new one

    async def create(value: float) -> None:
        async with database.transaction(write=True) as conn:
            await Repository(conn, STORE).create({**OBSERVATION, "valueQuantity": {"value": value}},
                                                 resource_id="twin")

    outcomes = await asyncio.gather(create(1.0), create(2.0), return_exceptions=True)
    assert sorted(type(o).__name__ for o in outcomes) == ["NoneType", "VersionConflict"]
    assert isinstance(next(o for o in outcomes if o is not None), VersionConflict)
    after = await row_counts()
    assert after["resource"] == alone["resource"] + 1
    assert after["history"] == alone["history"] + 2  # the deletion's version and the twin

"""`Repository.create_records`: a batch of server-written records (audit) stored in a few
statements, each exactly as a single create would store it: row, history, index rows."""


from typing import Any

import orjson
import pytest
from sqlalchemy import func, select

from fhirkit.search.request import parse_search
from fhirkit.store.repository import Repository, StoreConfig
from fhirkit.store.tables import INDEX_TABLES, resource, resource_history
from servicekit.db import Database

STORE = StoreConfig(resource_types=frozenset({"AuditEvent"}))


def audit(patient: str, action: str) -> dict[str, object]:
    return {
        "resourceType": "AuditEvent", "action": action, "recorded": "2026-11-23T08:00:00+08:00",
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"},
        "agent": [{"requestor": True, "who": {"reference": "Organization/thc-xikou"}}],
        "source": {"observer": {"reference": "Device/alliance-gateway"}},
        "entity": [{"what": {"reference": patient}}, {"what": {"reference": "Observation/o1"}, "detail": [
            {"type": "value", "valueString": "数量 4.0"}]}],
    }


async def test_a_batch_is_stored_row_history_and_indexes_each(database: Database) -> None:
    bodies = [audit(f"Patient/p{i}", "R" if i % 2 else "E") for i in range(25)]
    async with database.transaction(write=True) as conn:
        stored = await Repository(conn, STORE).create_records(bodies)

    assert len({resource_id for resource_id, _ in stored}) == 25
    for (resource_id, content), body in zip(stored, bodies):
        assert orjson.loads(content)["id"] == resource_id
        assert orjson.loads(content)["entity"] == body["entity"]  # in order: the answer pairs with its body
    async with database.transaction(write=False) as conn:
        ids = [row[0] for row in await conn.execute(select(resource.c.resource_id).order_by(resource.c.rid))]
        assert ids == [resource_id for resource_id, _ in stored]
        assert (await conn.execute(select(func.count()).select_from(resource_history))).scalar_one() == 25
        for table in INDEX_TABLES.values():
            rids = {row[0] for row in await conn.execute(select(table.c.rid))}
            assert rids <= {row[0] for row in await conn.execute(select(resource.c.rid))}
        repo = Repository(conn, STORE)
        for i in (0, 7, 24):
            page = await repo.search(parse_search("AuditEvent", [("entity", f"Patient/p{i}")]))
            assert [m.resource_id for m in page.matches] == [stored[i][0]]
        page = await repo.search(parse_search("AuditEvent", [("action", "R"), ("_count", "100")]))
        assert len(page.matches) == 12


@pytest.mark.parametrize("padding", [0, 4], ids=["as VALUES", "as arrays"])
async def test_insert_rows_keeps_awkward_values_exactly(database: Database, padding: int) -> None:
    """PostgreSQL gets a few rows as VALUES and more as one binary array per column: either way
    whole numbers mixed with fractions in a float column, text with quotes, braces and commas,
    Chinese text, bytes with NUL and missing values must all arrive as given (a text-format array
    refused the mixed numbers outright). `padding` plain rows push the statement past FEW_ROWS."""
    from fhirkit.store import driver
    from fhirkit.store.tables import quantity_index

    contents = [b'{"a":"\\u0000"}\x00\xff', None, "中文".encode(), *([b"{}"] * padding)]
    assert (len(contents) > driver.FEW_ROWS) == (padding > 0)  # the path the case names
    async with database.transaction(write=True) as conn:
        inserted = await driver.insert_rows(conn, resource, [
            {"resource_type": "Basic", "resource_id": f"r{i}", "version_id": 1, "last_updated": 1 + i,
             "deleted": False, "owner": None, "content": content} for i, content in enumerate(contents)
        ], returning=("resource_id", "rid"))
        rid = dict(inserted)["r0"]
        awkward = [(5, 'http://x/"{a,b}"\\', "mmol/L", "毫摩尔"), (5.5, None, None, None), (-2**53, "s", "c", None)]
        await driver.insert_rows(conn, quantity_index, [
            {"rid": rid, "resource_type": "Basic", "param": "value", "value": value, "system": system, "code": code,
             "unit": unit}
            for value, system, code, unit in [*awkward, *([(7, "p", "p", "p")] * padding)]
        ])
    async with database.transaction(write=False) as conn:
        stored = dict(list(await conn.execute(select(resource.c.resource_id, resource.c.content))))
        quantities = sorted(tuple(row) for row in await conn.execute(
            select(quantity_index.c.value, quantity_index.c.system, quantity_index.c.code, quantity_index.c.unit)))
    assert stored == {f"r{i}": content for i, content in enumerate(contents)}
    assert quantities == [(float(-2**53), "s", "c", None), (5.0, 'http://x/"{a,b}"\\', "mmol/L", "毫摩尔"),
                          (5.5, None, None, None), *([(7.0, "p", "p", "p")] * padding)]


async def test_insert_rows_skips_the_rows_whose_key_is_taken_and_returns_the_others(database: Database) -> None:
    """One row takes the compiled single-row statement, several the arrays: both skip alike."""
    from fhirkit.store import driver

    def row(resource_id: str) -> dict[str, Any]:
        return {"resource_type": "Basic", "resource_id": resource_id, "version_id": 1, "last_updated": 1,
                "deleted": False, "owner": None, "content": b"{}"}

    async def insert(*ids: str) -> set[str]:
        found = await driver.insert_rows(conn, resource, [row(i) for i in ids], returning=("resource_id",),
                                         skip_conflicts=True)
        return {resource_id for (resource_id,) in found}

    async with database.transaction(write=True) as conn:
        assert await insert("a") == {"a"}
        assert await insert("a") == set()
        assert await insert("a", "b", "c") == {"b", "c"}
        assert await insert("c", "d") == {"d"}
    async with database.transaction(write=False) as conn:
        assert sorted(r for (r,) in await conn.execute(select(resource.c.resource_id))) == ["a", "b", "c", "d"]

"""The indexes a search by patient and code reads, as migrated on SQLite and PostgreSQL: every
column the search reads of the reference and token index tables is in an index, so PostgreSQL
answers from the index alone once VACUUM has marked the pages all-visible."""

from typing import Any

from sqlalchemy import inspect

from fhirkit.store.tables import reference_index, token_index
from servicekit.db import Database

PATIENT_ROWS = ("resource_type", "param", "target_id", "target_type", "rid")
CODE_BY_RID = ("rid", "param", "code", "system", "resource_type")


async def _migrated_indexes(database: Database, table: str) -> set[tuple[str, ...]]:
    async with database.engine.connect() as conn:
        found: list[dict[str, Any]] = await conn.run_sync(lambda sync: inspect(sync).get_indexes(table))
    return {tuple(index["column_names"]) for index in found}


def _declared(table: Any) -> set[tuple[str, ...]]:
    return {tuple(column.name for column in index.columns) for index in table.indexes}


async def test_a_patients_rows_and_a_rows_code_are_read_from_indexes_alone(database: Database) -> None:
    references = await _migrated_indexes(database, "fhir_reference_index")
    tokens = await _migrated_indexes(database, "fhir_token_index")
    assert PATIENT_ROWS in references and PATIENT_ROWS[:-1] not in references
    assert CODE_BY_RID in tokens and ("rid",) not in tokens
    # The migrations build what the engine declares (tables.py), nothing more or less.
    assert references == _declared(reference_index)
    assert tokens == _declared(token_index)

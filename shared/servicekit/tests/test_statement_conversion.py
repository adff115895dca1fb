"""psycopg keeps the conversion of long statements (a search with its caller's access condition
is about 5 KB with 56 parameters) instead of re-parsing them on every execution."""

import os

import pytest
from psycopg import _queries
from sqlalchemy import bindparam, literal_column, select

from servicekit.db import Database

POSTGRES = os.environ.get("ALLIANCE_TEST_POSTGRES_URL")


@pytest.mark.skipif(not POSTGRES, reason="needs ALLIANCE_TEST_POSTGRES_URL")
async def test_a_long_statement_with_many_parameters_is_converted_once() -> None:
    database = Database(f"{POSTGRES}/postgres", pool_size=1)
    await database.start()
    names = [f"parameter_with_a_rather_long_name_{i}" for i in range(120)]
    # 120 parameters and over 4 KB of text: both past psycopg's own limits.
    stmt = select(*(bindparam(name) + literal_column("0") for name in names))
    values = {name: i for i, name in enumerate(names)}
    try:
        async with database.transaction(write=False) as conn:
            first = (await conn.execute(stmt, values)).one()
            hits = _queries._query2pg.cache_info().hits
            second = (await conn.execute(stmt, values)).one()
        assert len(str(stmt.compile(conn.sync_connection))) > 4096
        assert _queries._query2pg.cache_info().hits == hits + 1
        assert tuple(first) == tuple(second) == tuple(range(120))
    finally:
        await database.stop()

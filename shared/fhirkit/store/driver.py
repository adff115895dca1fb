"""The hot write statements, sent straight to the database driver of the request's transaction.

SQLAlchemy's execution path (cache key, compiled-statement look-up, parameter processing, result
wrapping) costs ~100 µs of CPU per statement, more than SQLite takes to run a small insert, and a
created resource runs six to ten statements of fixed shape: its row, its history row, its index
rows, its outbox event. Those statements are compiled here once per dialect and executed on the
driver connection that SQLAlchemy holds for the same transaction, so commit and rollback are
unchanged. SQLite (through `servicekit.sqlite_inline`) and psycopg are driven this way; any other
driver takes SQLAlchemy's path.

psycopg gets its statements with `$n` placeholders through a raw cursor: its own conversion of
`%(name)s` placeholders is cached only for statements under 4 KB and 50 parameters, and re-parsing
a version's history-and-index statement (hundreds of parameters) cost half of that write's CPU.
"""

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from psycopg import AsyncCursor, AsyncRawCursor
from sqlalchemy import Float, Table, insert
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Executable

Row = tuple[Any, ...]


class _Compiled:
    __slots__ = ("defaults", "names", "positional", "sql")

    def __init__(self, sql: str, names: Sequence[str], positional: bool, defaults: dict[str, Any]) -> None:
        self.sql, self.names, self.positional = sql, tuple(names), positional
        self.defaults = defaults  # values bound when the statement was built (a LIMIT's, a literal's)

    def parameters(self, values: dict[str, Any]) -> Any:
        if self.positional:
            return tuple(values[name] if name in values else self.defaults[name] for name in self.names)
        return {**self.defaults, **values} if self.defaults else values


# (id of the statement, dialect, keys) → the statement itself (so a recycled id is not taken for
# it) and its compiled form. Statements are module constants or kept per shape by their builders.
_compiled: dict[tuple[int, str, tuple[str, ...]], tuple[Executable, _Compiled]] = {}
MAX_COMPILED = 4096


_PYFORMAT = re.compile(r"%\((?P<name>[^)]+)\)s|%%")


def _numbered(sql: str) -> tuple[str, list[str]]:
    """A pyformat statement (`%(name)s`, `%%`) as psycopg's raw form (`$1`, `%`) and the names in
    the order of their numbers (a name used twice keeps its number)."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group("name")
        if name is None:
            return "%"
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _PYFORMAT.sub(number, sql), names


def _compile(statement: Executable, conn: AsyncConnection, keys: Sequence[str]) -> _Compiled:
    dialect = conn.dialect
    cache_key = (id(statement), dialect.name, tuple(keys))
    found = _compiled.get(cache_key)
    if found is not None and found[0] is statement:
        return found[1]
    compiled = statement.compile(dialect=dialect, column_keys=list(keys))  # type: ignore[attr-defined]
    sql, names, params = compiled.string, compiled.positiontup or list(compiled.params), compiled.params
    if compiled.post_compile_params:
        # IN lists of literal values (an access condition's types): one parameter per value.
        expanded = compiled.construct_expanded_state({key: None for key in keys})
        sql, names, params = expanded.statement, expanded.positiontup or list(expanded.parameters), expanded.parameters
    positional = bool(compiled.positional)
    if dialect.driver == "psycopg" and not positional:
        sql, names = _numbered(sql)
        positional = True
    defaults = {name: value for name, value in params.items() if name not in keys}
    ready = _Compiled(sql, names, positional, defaults)
    if len(_compiled) >= MAX_COMPILED:
        _compiled.clear()
    _compiled[cache_key] = (statement, ready)
    return ready


def driver_connection(conn: AsyncConnection) -> Any:
    """The DBAPI driver's own connection under a started `conn` (psycopg's, or sqlite_inline's),
    read straight off it: `get_raw_connection()` spawns a greenlet to read the same attribute,
    which only an invalidated connection needs (to reconnect). A request's connection is not: one
    lost under a request has failed that request already (503, `fhirkit.api.handlers`)."""
    return conn.sync_connection.connection.driver_connection  # type: ignore[union-attr]


def _driver(conn: AsyncConnection) -> Any:
    """The driver's connection if it is one this module drives, else None."""
    connection = driver_connection(conn)
    if hasattr(connection, "run_statement") or conn.dialect.driver == "psycopg":
        return connection
    return None


async def execute(conn: AsyncConnection, statement: Executable, values: dict[str, Any]) -> list[Row]:
    """Runs `statement` (built once, at import) with `values`; returns its rows (RETURNING)."""
    connection = _driver(conn)
    if connection is None:
        return [tuple(row) for row in (await conn.execute(statement, values)).fetchall()]
    await flush_gathered(conn)
    compiled = _compile(statement, conn, list(values))
    return await _run(connection, compiled, compiled.parameters(values), many=False)


async def execute_many(conn: AsyncConnection, statement: Executable, rows: Sequence[dict[str, Any]]) -> None:
    """Runs an insert once per row (the rows share their keys); returns nothing."""
    if not rows:
        return
    connection = _driver(conn)
    if connection is None:
        await conn.execute(statement, list(rows))
        return
    await flush_gathered(conn)
    compiled = _compile(statement, conn, list(rows[0]))
    if len(rows) == 1:  # psycopg's executemany enters pipeline mode: costly for one row
        await _run(connection, compiled, compiled.parameters(rows[0]), many=False)
        return
    await _run(connection, compiled, [compiled.parameters(row) for row in rows], many=True)


async def insert_rows(
    conn: AsyncConnection, table: Table, rows: Sequence[dict[str, Any]], returning: tuple[str, ...] = (),
    *, skip_conflicts: bool = False,
) -> list[Row]:
    """Many rows (sharing their keys) into `table`. On PostgreSQL in one statement: up to
    `FEW_ROWS` as `INSERT … VALUES`, more as `INSERT … SELECT FROM unnest(one array per column)`,
    whose text does not change with the number of rows (it is prepared once); elsewhere one
    insert per row. Returns the `returning` columns of the rows, in no promised order.
    `skip_conflicts`: a row whose key exists already is left out (ON CONFLICT DO NOTHING) and
    returns nothing."""
    if not rows:
        return []
    connection = _driver(conn) if conn.dialect.name == "postgresql" else None
    gathered = _take_gathered(conn) if connection is not None else []
    if connection is not None and (len(rows) > 1 or gathered):  # one row alone: the plain insert, prepared
        sql, parameters = _inserts_sql([*gathered, (table, rows)], returning, skip_conflicts)
        return await _run_binary(connection, sql, parameters)
    statement = _plain_insert(table, conn.dialect.name, returning, skip_conflicts)
    if not returning:
        await execute_many(conn, statement, rows)
        return []
    return [found for row in rows for found in await execute(conn, statement, row)]


# --- rows gathered into the next insert -----------------------------------------------------------

_GATHERED = "fhirkit.driver.gathered_rows"


@asynccontextmanager
async def gathering(conn: AsyncConnection) -> AsyncIterator[None]:
    """Within the block, `insert_later`'s rows wait for the next statement this module sends on
    `conn`: an `insert_rows` takes them along in one statement (a data-modifying CTE per table),
    any other goes after writing them, and the block's end writes what is left. A write's
    after-hooks add an outbox event and then their own rows (a lab result's recognition rows):
    one round trip instead of two, each ~0.1 ms of the worker's CPU. The rows wait in Python,
    so a statement sent past this module (`conn.execute`) does not see them yet. On an error
    they are dropped with the transaction. PostgreSQL only: SQLite has no round trip to save."""
    if conn.dialect.name != "postgresql" or _GATHERED in conn.info or _driver(conn) is None:
        yield  # SQLite, or inside a gathering block already: the outer block writes them
        return
    conn.info[_GATHERED] = []
    try:
        yield
        await flush_gathered(conn)
    finally:
        conn.info.pop(_GATHERED, None)


async def insert_later(conn: AsyncConnection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """`rows` into `table`, now or (inside `gathering`) with the next statement: for rows that
    nothing in the same write reads back through SQLAlchemy."""
    gathered = conn.info.get(_GATHERED)
    if gathered is None:
        await insert_rows(conn, table, rows)
    elif rows:
        gathered.append((table, rows))


async def flush_gathered(conn: AsyncConnection) -> None:
    """Writes the rows `insert_later` gathered, if any (one statement)."""
    gathered = _take_gathered(conn)
    if gathered:
        sql, parameters = _inserts_sql(gathered, (), False)
        await _run_binary(_driver(conn), sql, parameters)


def _take_gathered(conn: AsyncConnection) -> list[tuple[Table, Sequence[dict[str, Any]]]]:
    """The rows gathered so far, handed over once: the block goes on gathering anew."""
    gathered = conn.info.get(_GATHERED)
    if not gathered:
        return []
    conn.info[_GATHERED] = []
    return gathered


def _inserts_sql(
    parts: Sequence[tuple[Table, Sequence[dict[str, Any]]]], returning: tuple[str, ...], skip_conflicts: bool
) -> tuple[str, list[Any]]:
    """Rows for one or more tables as one statement and its parameters: the last part as the
    statement, those before it as data-modifying CTEs (they cannot see each other's rows, and
    need not)."""
    steps, parameters = [], []
    for n, (table, rows) in enumerate(parts):
        last = n == len(parts) - 1
        keys = tuple(name for name in table.c.keys() if any(name in row for row in rows))
        few = len(rows) <= FEW_ROWS
        if few:
            parameters += [row.get(key) for row in rows for key in keys]
        else:
            parameters += [_column_array(table, key, rows) for key in keys]
        steps.append(_insert_sql(table, keys, len(rows) if few else None, returning if last else (),
                                 skip_conflicts and last))
    if len(steps) == 1:
        return steps[0], parameters
    ctes = ", ".join(f"gathered_{n} AS ({sql})" for n, sql in enumerate(steps[:-1]))
    return f"WITH {ctes} {steps[-1]}", parameters


# Up to this many rows go as VALUES: for a few rows, building and unnesting arrays costs more than
# it saves. A create's outbox row and recognition row as unnest arrays in one statement were
# slower than as two plain inserts (6 pairs of 6); as VALUES, faster (5 of 6; session 16).
FEW_ROWS = 4
# (table, columns, number of VALUES rows or None for arrays, returning, skip_conflicts) → the
# insert, built once.
_INSERTS: dict[tuple[str, tuple[str, ...], int | None, tuple[str, ...], bool], str] = {}


def _insert_sql(table: Table, keys: tuple[str, ...], count: int | None, returning: tuple[str, ...],
                skip_conflicts: bool) -> str:
    """`count` rows as `VALUES`, or (None) any number as `unnest` of one array per column."""
    cache_key = (table.name, keys, count, returning, skip_conflicts)
    found = _INSERTS.get(cache_key)
    if found is None:
        if count is None:
            # `%b`: the arrays go in PostgreSQL's binary format. psycopg writes a text-format array
            # in Python, escaping every element: 2.7 ms for 700 short strings and 2.5 ms for 60
            # stored resources, against 0.34 and 0.06 ms in binary (an audit batch is about that size).
            dialect = postgresql.dialect()
            arrays = ", ".join(f"CAST(%b AS {table.c[key].type.compile(dialect=dialect)}[])" for key in keys)
            source = f"SELECT * FROM unnest({arrays})"
        else:
            row = "(" + ", ".join("%s" for _ in keys) + ")"
            source = "VALUES " + ", ".join(row for _ in range(count))
        sql = f"INSERT INTO {table.name} ({', '.join(keys)}) {source}"
        sql += " ON CONFLICT DO NOTHING" if skip_conflicts else ""
        found = _INSERTS[cache_key] = sql + _returning(returning)
    return found


def _column_array(table: Table, key: str, rows: Sequence[dict[str, Any]]) -> list[Any]:
    values = [row.get(key) for row in rows]
    if isinstance(table.c[key].type, Float):  # a binary array holds one type: 5 and 5.5 are both float8
        return [None if value is None else float(value) for value in values]
    return values


async def _run_binary(connection: Any, sql: str, parameters: list[Any]) -> list[Row]:
    try:
        async with AsyncCursor(connection) as cursor:
            await cursor.execute(sql, parameters)
            return await cursor.fetchall() if cursor.description else []
    except Exception as error:
        raise as_dbapi_error(sql, error) from error


# (table, dialect, returning, skip_conflicts) → the single-row insert, built once.
_PLAIN_INSERTS: dict[tuple[str, str, tuple[str, ...], bool], Any] = {}


def _plain_insert(table: Table, dialect: str, returning: tuple[str, ...], skip_conflicts: bool) -> Any:
    found = _PLAIN_INSERTS.get((table.name, dialect, returning, skip_conflicts))
    if found is None:
        if not skip_conflicts:
            statement = insert(table)
        elif dialect == "postgresql":
            statement = postgresql.insert(table).on_conflict_do_nothing()
        else:  # SQLite, the only other database the product runs on
            statement = sqlite.insert(table).on_conflict_do_nothing()
        found = _PLAIN_INSERTS[(table.name, dialect, returning, skip_conflicts)] = (
            statement.returning(*(table.c[name] for name in returning)) if returning else statement)
    return found


def _returning(columns: tuple[str, ...]) -> str:
    return f" RETURNING {', '.join(columns)}" if columns else ""


async def _run(connection: Any, compiled: _Compiled, parameters: Any, *, many: bool) -> list[Row]:
    """One statement on the driver connection: SQLite (servicekit.sqlite_inline) or psycopg."""
    try:
        if hasattr(connection, "run_statement"):
            return await connection.run_statement(compiled.sql, parameters, many=many)
        async with AsyncRawCursor(connection) as cursor:
            if many:
                await cursor.executemany(compiled.sql, parameters)
                return []
            await cursor.execute(compiled.sql, parameters)
            return await cursor.fetchall() if cursor.description else []
    except Exception as error:
        raise as_dbapi_error(compiled.sql, error) from error


@contextmanager
def planned_for_values(conn: AsyncConnection) -> Iterator[None]:
    """Statements run meanwhile are planned for their values, not prepared. psycopg prepares a
    statement after five runs, and PostgreSQL may then settle on a generic plan, which for a
    search cannot tell a patient (a few rows) from a lab code (a share of the store): it drove
    `Observation?patient&code` from every row of the code, 17 ms at 40,000 results against
    1.5 ms planned for the values, and growing with the store. Client-side only (no statement,
    unlike `SET plan_cache_mode`); for the rest, generic plans are kept: planning a read by id's
    access condition each time cost PostgreSQL 0.37 ms per read."""
    connection = _driver(conn)
    if connection is None or not hasattr(connection, "prepare_threshold"):  # SQLite: nothing prepared
        yield
        return
    kept = connection.prepare_threshold
    connection.prepare_threshold = None
    try:
        yield
    finally:
        connection.prepare_threshold = kept


def as_dbapi_error(sql: str, error: Exception) -> Exception:
    """The driver's error as SQLAlchemy would raise it (callers and the error handlers know those),
    without the bound values (they may be patient data)."""
    if isinstance(error, DBAPIError):
        return error
    return DBAPIError.instance(sql, None, error, Exception, hide_parameters=True)


def transaction_memo(conn: AsyncConnection, name: str) -> dict[Any, Any]:
    """A dict that lives as long as the connection's current transaction: for look-ups that every
    entry of a bundle repeats (a catalog item, a center's quality records). A writer of what such a
    memo holds clears it in the same transaction."""
    transaction = conn.sync_connection.get_transaction() if conn.sync_connection is not None else None
    if transaction is None:  # outside a transaction (a lone statement): nothing to remember across
        return {}
    memos = conn.info.get("transaction_memos")
    if memos is None or memos[0] is not transaction:
        memos = (transaction, {})
        conn.info["transaction_memos"] = memos
    return memos[1].setdefault(name, {})


async def memoised(conn: AsyncConnection, name: str, key: Any, load: Callable[[], Awaitable[Any]]) -> Any:
    """`load()`'s answer for `key`, loaded once per transaction (see `transaction_memo`)."""
    memo = transaction_memo(conn, name)
    if key not in memo:
        memo[key] = await load()
    return memo[key]

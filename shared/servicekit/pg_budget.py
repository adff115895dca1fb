"""Whether the PostgreSQL servers a process uses accept as many connections as its pools may open.

`alliance serve` runs this before it starts the workers, in the supervisor process, which
otherwise imports neither SQLAlchemy nor the services: so this module imports psycopg alone.
"""

from collections.abc import Callable, Iterable
from urllib.parse import unquote, urlsplit


def connection_budget(
    urls: Iterable[str], workers: int, pool_size: int,
    max_connections: Callable[[str], int | None] | None = None,
) -> list[str]:
    """Warnings for PostgreSQL servers that these processes could ask for more connections than
    they accept: each worker keeps up to `pool_size` per database (opened as requests need them,
    never more), and past the server's limit a request is answered 503: better said once at start
    than found under load. `max_connections(url)` is the server's limit, None when it cannot be
    asked."""
    ask = max_connections or server_max_connections
    by_server: dict[str, list[str]] = {}
    for url in urls:
        if url.startswith("postgresql"):
            parsed = urlsplit(url)
            by_server.setdefault(f"{parsed.hostname or 'localhost'}:{parsed.port or 5432}", []).append(url)
    warnings = []
    for server, databases in by_server.items():
        need = workers * len(databases) * pool_size
        limit = ask(databases[0])
        if limit is not None and pool_size > largest_pool(limit, workers, len(databases)):
            warnings.append(
                f"PostgreSQL at {server} accepts {limit} connections; {workers} worker(s) may open up to {need} "
                f"({len(databases)} database(s) × ALLIANCE_DATABASE_POOL_SIZE {pool_size} each), and requests "
                "past its limit are answered 503: raise max_connections or lower the pool size (docs/operations.md)")
    return warnings


def largest_pool(limit: int, workers: int, databases: int) -> int:
    """The largest pool size whose connections fit a server accepting `limit`: each of `workers`
    keeps up to the pool size per database."""
    return limit // (workers * databases)


def server_max_connections(url: str) -> int | None:
    """The connections a PostgreSQL server accepts from ordinary roles; None if it cannot be asked."""
    import psycopg

    parsed = urlsplit(url)
    own = unquote(parsed.path.lstrip("/"))
    for database in (own, "postgres"):  # the service's database may not be created yet
        try:
            dsn = parsed._replace(scheme="postgresql", path=f"/{database}").geturl()
            with psycopg.connect(dsn, connect_timeout=3) as conn:
                total = int(conn.execute("SHOW max_connections").fetchone()[0])  # type: ignore[index]
                reserved = int(conn.execute("SHOW superuser_reserved_connections").fetchone()[0])  # type: ignore[index]
            return total - reserved
        except Exception:  # not up yet, or not reachable: readiness reports that
            continue
    return None

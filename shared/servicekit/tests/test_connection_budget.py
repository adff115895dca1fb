"""`alliance serve` warns when its workers could ask a PostgreSQL server for more connections
than it accepts (requests past the limit would be answered 503)."""

import os

import pytest

from servicekit.pg_budget import connection_budget, server_max_connections

POSTGRES = os.environ.get("ALLIANCE_TEST_POSTGRES_URL")
DATABASES = [f"postgresql+psycopg://app@db.county:5432/{name}" for name in ("directory", "referral", "platform")]


def test_workers_databases_and_pool_past_the_servers_limit_are_named_in_a_warning() -> None:
    warnings = connection_budget(DATABASES, workers=2, pool_size=20, max_connections=lambda url: 97)
    assert len(warnings) == 1
    assert "db.county:5432 accepts 97 connections" in warnings[0]
    assert "up to 120" in warnings[0]  # 2 workers × 3 databases × 20


def test_a_budget_within_the_limit_and_sqlite_and_unreachable_servers_warn_of_nothing() -> None:
    assert connection_budget(DATABASES, workers=2, pool_size=16, max_connections=lambda url: 97) == []  # 96
    assert connection_budget(["sqlite+aiosqlite:///x.db"], workers=8, pool_size=200,
                             max_connections=lambda url: 1) == []
    assert connection_budget(DATABASES, workers=8, pool_size=200, max_connections=lambda url: None) == []


def test_databases_on_two_servers_are_counted_per_server() -> None:
    urls = [*DATABASES[:2], "postgresql+psycopg://app@audit.county:6432/platform"]
    limits = {"db.county": 50, "audit.county": 50}
    warnings = connection_budget(urls, workers=1, pool_size=30,
                                 max_connections=lambda url: limits[url.split("@")[1].split(":")[0]])
    assert len(warnings) == 1 and "db.county:5432" in warnings[0] and "up to 60" in warnings[0]  # audit: 30


@pytest.mark.skipif(not POSTGRES, reason="needs ALLIANCE_TEST_POSTGRES_URL")
def test_the_servers_limit_is_read_from_the_server() -> None:
    limit = server_max_connections(f"{POSTGRES}/postgres")
    assert limit is not None and 0 < limit < 100_000
    assert server_max_connections(f"{POSTGRES}/no_such_database") == limit  # asked through `postgres`
    assert server_max_connections("postgresql+psycopg://nobody@127.0.0.1:1/none") is None

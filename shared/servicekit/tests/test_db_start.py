"""Start-up checks of a service database."""

import logging
import os

import psycopg
import pytest

from servicekit.db import Database

POSTGRES = os.environ.get("ALLIANCE_TEST_POSTGRES_URL")


@pytest.mark.skipif(not POSTGRES, reason="needs ALLIANCE_TEST_POSTGRES_URL")
async def test_a_server_without_autovacuum_is_named_in_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    url = f"{POSTGRES}/postgres"
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        row = conn.execute("SHOW autovacuum").fetchone()
    database = Database(url)
    with caplog.at_level(logging.WARNING, logger="alliance.db"):
        await database.start()
    await database.stop()
    warned = [r.getMessage() for r in caplog.records if r.name == "alliance.db"]
    if row and row[0] == "on":
        assert warned == []
    else:
        assert len(warned) == 1 and "autovacuum is off" in warned[0] and "postgres" in warned[0]


async def test_an_unreachable_server_does_not_stop_the_start(caplog: pytest.LogCaptureFixture) -> None:
    database = Database("postgresql+psycopg://nobody@127.0.0.1:1/none")
    with caplog.at_level(logging.WARNING, logger="alliance.db"):
        await database.start()  # readiness reports the database; the start-up check stays quiet
    await database.stop()
    assert not [r for r in caplog.records if r.name == "alliance.db"]

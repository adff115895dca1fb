"""The store tests' database: a fresh one per test, on SQLite and, with
ALLIANCE_TEST_POSTGRES_URL, on PostgreSQL too, copied from a migrated template per module."""

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from servicekit.db import Database
from servicekit.events.testing import DatabaseTemplates, database_params, running


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatabaseTemplates]:
    found = DatabaseTemplates(tmp_path_factory.mktemp("store"))
    yield found
    found.drop_all()


@pytest_asyncio.fixture(params=database_params())
async def database(request: pytest.FixtureRequest, templates: DatabaseTemplates) -> AsyncIterator[Database]:
    async with running(templates.url(str(request.param))) as found:
        yield found

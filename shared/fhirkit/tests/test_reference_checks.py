"""Reference checks remember, for the rest of a transaction, what they confirmed (a bundle of a
hundred results names one target a hundred times), and forget it when the target changes."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from fhirkit.errors import UnprocessableEntity
from fhirkit.store.repository import Repository, StoreConfig
from servicekit.db import Database
from servicekit.events.testing import migrate, running

STORE = StoreConfig(resource_types=frozenset({"Patient", "Organization"}))
ORGANIZATION = {"resourceType": "Organization", "name": "青溪县人民医院"}


def patient_of(organization_id: str) -> dict[str, object]:
    return {"resourceType": "Patient", "managingOrganization": {"reference": f"Organization/{organization_id}"}}


@pytest_asyncio.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'store.db'}"
    migrate(url)
    async with running(url) as found:
        yield found


async def test_a_target_deleted_later_in_the_transaction_is_missing_again(database: Database) -> None:
    async with database.transaction(write=True) as conn:
        repo = Repository(conn, STORE)
        await repo.create(ORGANIZATION, resource_id="o1")
        await repo.check_references(patient_of("o1"))  # confirmed, and remembered
        await repo.delete("Organization", "o1")
        with pytest.raises(UnprocessableEntity, match="Organization/o1, which does not exist"):
            await repo.check_references(patient_of("o1"))


async def test_what_a_transaction_confirmed_is_not_taken_into_the_next(database: Database) -> None:
    with pytest.raises(RuntimeError):
        async with database.transaction(write=True) as conn:
            repo = Repository(conn, STORE)
            await repo.create(ORGANIZATION, resource_id="o2")
            await repo.check_references(patient_of("o2"))
            raise RuntimeError("roll back")  # o2 is gone with the transaction
    async with database.transaction(write=True) as conn:
        with pytest.raises(UnprocessableEntity, match="Organization/o2"):
            await Repository(conn, STORE).check_references(patient_of("o2"))


async def test_a_refusal_names_where_the_missing_target_is_first_written(database: Database) -> None:
    """The walk that finds references keeps no paths; the refusal finds the first mention's."""
    patient = {
        "resourceType": "Patient",
        "managingOrganization": {"reference": "Organization/o3"},
        "generalPractitioner": [{"reference": "Organization/o3"}, {"reference": "Organization/gone"},
                                {"reference": "Organization/gone/_history/2"}],
        "contained": [{"resourceType": "Organization", "id": "c1"}],
        "link": [{"other": {"reference": "#c1"}, "type": "seealso"}],
    }
    async with database.transaction(write=True) as conn:
        repo = Repository(conn, STORE)
        await repo.create(ORGANIZATION, resource_id="o3")
        [targets] = await repo.prefetch_references([patient])
        assert targets == ({("Organization", "o3"): "Organization/o3", ("Organization", "gone"): "Organization/gone"}, {})
        for given in (targets, None):  # as a transaction hands them over, and found afresh
            with pytest.raises(UnprocessableEntity) as refused:
                await repo.check_references(patient, given)
            assert refused.value.expression == ["Patient.generalPractitioner[1].reference"]
            assert "Organization/gone, which does not exist" in str(refused.value)

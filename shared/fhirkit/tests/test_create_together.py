"""A transaction's run of creates written together (`Repository.create_together`): the same rows as
one create at a time, the hooks' batch contract (fhirkit.store.hooks.BatchHooks), errors placed
at their entry, and nothing written when any of them is refused."""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from fhirkit.api.bundles import BundleProcessor
from fhirkit.api.interactions import RequestOptions
from fhirkit.errors import BusinessRuleViolation, FhirError, VersionConflict
from fhirkit.search.request import parse_search
from fhirkit.store.hooks import NoHooks, WriteContext
from fhirkit.store.repository import Repository, StoreConfig
from servicekit.db import Database

Counts = Callable[[], Awaitable[dict[str, int]]]  # the row_counts fixture (conftest.py)


def observation(number: int, **changes: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation", "status": "final",
        "identifier": [{"system": "http://lis.example/obs", "value": f"A-{number}"}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7", "display": "葡萄糖"}]},
        "subject": {"reference": "Patient/p1"}, "effectiveDateTime": f"2026-11-{10 + number:02d}T08:00:00+08:00",
        "valueQuantity": {"value": 5 + number / 10, "unit": "mmol/L", "system": "http://unitsofmeasure.org",
                          "code": "mmol/L"},
        **changes,
    }


@dataclass
class RecordingHooks:
    """Batch hooks that record what they are shown and refuse a body whose status is `refused`."""

    calls: list[tuple[str, Any]] = field(default_factory=list)

    async def before_write(self, repo: Repository, resource: dict[str, Any] | None, context: WriteContext) -> None:
        # In a run its hooks have the run's memo; a create alone has none.
        self.calls.append(("before_write" if repo.batch_memo is not None else "alone", context.resource_id))
        if resource is not None and resource.get("status") == "cancelled":
            raise BusinessRuleViolation("refused on purpose", expression=["Observation.status"])

    async def after_write(self, repo: Repository, resource: dict[str, Any] | None, context: WriteContext) -> None:
        self.calls.append(("after_write", context.resource_id))

    def creates_together(self, resource: dict[str, Any]) -> bool:
        return resource.get("status") != "preliminary"  # a preliminary result is written alone

    async def before_creates(self, repo: Repository, resources: list[dict[str, Any]]) -> None:
        self.calls.append(("before_creates", [body["id"] for body in resources]))

    async def after_creates(self, repo: Repository, resources: list[dict[str, Any]],
                            contexts: list[WriteContext]) -> None:
        self.calls.append(("after_creates", [(c.resource_id, c.stored.version_id, c.interaction) for c in contexts]))


def store(hooks: Any) -> StoreConfig:
    return StoreConfig(resource_types=frozenset({"Observation", "Patient"}), hooks={"Observation": hooks})


async def _with_patient(database: Database) -> None:
    async with database.transaction(write=True) as conn:
        await Repository(conn, store(NoHooks())).update("Patient", "p1", {"resourceType": "Patient", "id": "p1"})


async def test_a_run_writes_the_rows_that_one_create_at_a_time_writes(database: Database, row_counts: Counts) -> None:
    await _with_patient(database)
    start = await row_counts()
    async with database.transaction(write=True) as conn:
        for number in range(3):
            await Repository(conn, store(NoHooks())).create(observation(number), resource_id=f"alone-{number}")
    alone = await row_counts()
    async with database.transaction(write=True) as conn:
        outcomes = await Repository(conn, store(NoHooks())).create_together(
            [observation(number) for number in range(3)], [f"run-{n}" for n in range(3)],
            [f"Bundle.entry[{n}]" for n in range(3)])
    together = await row_counts()
    assert [(o.stored.resource_id, o.stored.version_id, o.created) for o in outcomes] == [
        (f"run-{n}", 1, True) for n in range(3)]
    assert {name: together[name] - alone[name] for name in together} == {
        name: alone[name] - start[name] for name in alone}
    async with database.transaction(write=False) as conn:
        repo = Repository(conn, store(NoHooks()))
        for name, value in [("identifier", "A-2"), ("date", "2026-11-12"), ("value-quantity", "5.2"),
                            ("code", "http://loinc.org|2345-7"), ("subject", "Patient/p1")]:
            page = await repo.search(parse_search("Observation", [(name, value), ("_id", "run-2,alone-2")]))
            assert sorted(m.resource_id for m in page.matches) == ["alone-2", "run-2"], (name, value)
        read = await repo.read("Observation", "run-1")
    assert read.parsed()["id"] == "run-1" and read.content == outcomes[1].stored.content


async def test_the_hooks_see_the_run_at_once_then_each_body_in_order_then_the_stored_versions(
    database: Database,
) -> None:
    await _with_patient(database)
    hooks = RecordingHooks()
    async with database.transaction(write=True) as conn:
        await Repository(conn, store(hooks)).create_together(
            [observation(n) for n in range(3)], ["a", "b", "c"], ["e0", "e1", "e2"])
    assert hooks.calls == [
        ("before_creates", ["a", "b", "c"]),
        ("before_write", "a"), ("before_write", "b"), ("before_write", "c"),
        ("after_creates", [("a", 1, "create"), ("b", 1, "create"), ("c", 1, "create")]),
    ]


@pytest.mark.parametrize(("bad", "expected"), [
    ({"status": "cancelled"}, "refused on purpose"),  # the hook refuses it
    ({"valueQuantity": {"value": "five"}}, "value"),  # the profile refuses it
])
async def test_a_refused_body_is_named_by_its_place_and_nothing_of_the_run_is_kept(
    database: Database, row_counts: Counts, bad: dict[str, Any], expected: str,
) -> None:
    await _with_patient(database)
    before = await row_counts()
    with pytest.raises(FhirError) as refused:
        async with database.transaction(write=True) as conn:
            await Repository(conn, store(RecordingHooks())).create_together(
                [observation(0), observation(1, **bad), observation(2)], ["a", "b", "c"],
                ["Bundle.entry[0]", "Bundle.entry[1]", "Bundle.entry[2]"])
    assert refused.value.diagnostics.startswith("Bundle.entry[1]: ") and expected in str(refused.value.to_outcome())
    assert await row_counts() == before


async def test_an_id_taken_already_refuses_the_run_whole(database: Database, row_counts: Counts) -> None:
    await _with_patient(database)
    async with database.transaction(write=True) as conn:
        await Repository(conn, store(NoHooks())).create(observation(9), resource_id="taken")
    before = await row_counts()
    with pytest.raises(VersionConflict, match="Observation/taken was created concurrently"):
        async with database.transaction(write=True) as conn:
            await Repository(conn, store(NoHooks())).create_together(
                [observation(0), observation(1)], ["fresh", "taken"], ["e0", "e1"])
    assert await row_counts() == before


async def test_a_transaction_writes_consecutive_creates_its_hooks_allow_together(database: Database) -> None:
    """Runs break at a create the hooks keep alone and at a create of another type."""
    await _with_patient(database)
    hooks = RecordingHooks()
    bodies = [observation(0), observation(1), observation(2, status="preliminary"), observation(3),
              {"resourceType": "Patient", "active": True}, observation(4), observation(5)]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": body, "request": {"method": "POST", "url": body["resourceType"]}} for body in bodies]}
    async with database.transaction(write=True) as conn:
        repo = Repository(conn, store(hooks))
        answer = await BundleProcessor(repo, RequestOptions(base="http://test/fhir"), _no_savepoint).transaction(bundle)
    assert answer.count(b'"status":"201 Created"') == 7
    kinds = [name for name, _ in hooks.calls]
    # Entries 0-1 together; 2 (preliminary) alone; 3 alone (a run of one); the Patient has no
    # hooks here; 5-6 together.
    assert kinds == ["before_creates", "before_write", "before_write", "after_creates",
                     "alone", "after_write", "alone", "after_write",
                     "before_creates", "before_write", "before_write", "after_creates"]


def _no_savepoint() -> Any:
    raise AssertionError("a transaction takes no savepoint per entry")

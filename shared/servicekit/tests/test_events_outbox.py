"""The outbox: an event row exactly when its change commits, on SQLite and PostgreSQL."""

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import func, select, text, update

from fhirkit import jsonio
from fhirkit.store import driver
from fhirkit.store.hooks import WriteContext
from fhirkit.store.repository import Repository, StoreConfig
from fhirkit.store.tables import access_opt_out
from fhirkit.store.tables import resource as resource_table
from servicekit.db import Database
from servicekit.events import Event, InProcessBus, ServiceEvents, emit, outbox, subject_matches
from servicekit.events.dispatcher import pending_statement
from servicekit.events.envelope import event_from_message, event_from_row, message_headers
from servicekit.events.testing import DatabaseTemplates, count, database_params, running

DATABASES = database_params()


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatabaseTemplates]:
    found = DatabaseTemplates(tmp_path_factory.mktemp("events-outbox"))
    yield found
    found.drop_all()


@pytest_asyncio.fixture(params=DATABASES)
async def database(request: pytest.FixtureRequest, templates: DatabaseTemplates) -> AsyncIterator[Database]:
    async with running(templates.url(request.param)) as found:
        yield found


class RecordingHooks:
    """A service's own hooks: they must still run, and may refuse a write."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def before_write(
        self, repo: Repository, resource: dict[str, Any] | None, context: WriteContext
    ) -> None:
        self.calls.append(f"before:{context.interaction}")
        if resource is not None and resource.get("gender") == "unknown":
            raise ValueError("refused by the service")

    async def after_write(
        self, repo: Repository, resource: dict[str, Any] | None, context: WriteContext
    ) -> None:
        self.calls.append(f"after:{context.interaction}")


def _store(database: Database, hooks: dict[str, Any] | None = None) -> StoreConfig:
    events = ServiceEvents("directory", database, InProcessBus())
    types = frozenset({"Patient", "Observation"})
    return StoreConfig(
        resource_types=types, hooks=events.store_hooks(types, hooks or {}), check_references=False
    )


async def _events(database: Database) -> list[Event]:
    async with database.transaction(write=False) as conn:
        return [event_from_row(row) for row in await conn.execute(select(outbox).order_by(outbox.c.seq))]


async def _stored(database: Database, resource_id: str) -> bytes | None:
    async with database.transaction(write=False) as conn:
        row = (
            await conn.execute(
                select(resource_table.c.content).where(resource_table.c.resource_id == resource_id)
            )
        ).one()
        return row.content


async def test_every_write_appends_an_event_with_the_stored_resource(database: Database) -> None:
    hooks = RecordingHooks()
    store = _store(database, {"Patient": hooks})
    body = jsonio.loads(
        b'{"resourceType":"Patient","id":"p1","active":true,'
        b'"extension":[{"url":"http://x","valueDecimal":1.50}]}'
    )
    async with database.transaction(write=True) as conn:
        repo = Repository(conn, store, owner="Organization/county-hospital")
        await repo.update("Patient", "p1", body)  # a PUT that creates
        await repo.update("Patient", "p1", {**body, "active": False})
        await repo.patch("Patient", "p1", lambda current: {**current, "gender": "female"})
    patched_content = await _stored(database, "p1")
    async with database.transaction(write=True) as conn:
        await Repository(conn, store).delete("Patient", "p1")

    events = await _events(database)
    assert [(e.type, e.version_id) for e in events] == [
        ("create", 1),
        ("update", 2),
        ("patch", 3),
        ("delete", 4),
    ]
    assert all(
        e.service == "directory" and e.kind == "resource" and e.reference == "Patient/p1" for e in events
    )
    assert all(e.owner == "Organization/county-hospital" for e in events)
    assert [e.subject for e in events][:2] == ["directory.Patient.create", "directory.Patient.update"]
    assert events[2].payload == patched_content  # the very bytes a reader gets
    assert b'"valueDecimal":1.50' in (events[0].payload or b"")
    assert events[0].json()["meta"]["versionId"] == "1"
    assert events[3].payload is None
    assert [e.seq for e in events] == sorted({e.seq for e in events})
    assert len({e.id for e in events}) == 4
    assert hooks.calls == ["before:update", "after:update"] * 2 + [
        "before:patch",
        "after:patch",
        "before:delete",
        "after:delete",
    ]


async def test_a_rolled_back_write_leaves_no_event(database: Database) -> None:
    store = _store(database, {"Patient": RecordingHooks()})
    with pytest.raises(RuntimeError):
        async with database.transaction(write=True) as conn:
            await Repository(conn, store).create(
                {"resourceType": "Patient", "active": True}, resource_id="gone"
            )
            assert await conn.scalar(select(outbox.c.seq).where(outbox.c.resource_id == "gone")) is not None
            raise RuntimeError("the request failed after the write")
    with pytest.raises(ValueError):
        async with database.transaction(write=True) as conn:
            await Repository(conn, store).create(
                {"resourceType": "Patient", "gender": "unknown"}, resource_id="refused"
            )
    assert await count(database, "servicekit_outbox") == 0
    assert await count(database, "fhir_resource") == 0


async def test_an_unchanged_update_announces_nothing(database: Database) -> None:
    store = _store(database)
    body = {"resourceType": "Patient", "id": "same", "active": True}
    for _ in range(2):
        async with database.transaction(write=True) as conn:
            await Repository(conn, store).update("Patient", "same", body)
    assert [e.type for e in await _events(database)] == ["create"]


async def test_emit_appends_a_business_event_in_the_callers_transaction(database: Database) -> None:
    async with database.transaction(write=True) as conn:
        emitted = await emit(
            conn,
            "referral.accepted",
            {"serviceRequest": "ServiceRequest/sr1", "score": jsonio.loads(b'{"v":2.50}')["v"]},
            service="referral",
            resource_type="ServiceRequest",
            resource_id="sr1",
            owner="Organization/a",
        )
    with pytest.raises(RuntimeError):
        async with database.transaction(write=True) as conn:
            await emit(conn, "referral.rejected", {"x": 1}, service="referral")
            raise RuntimeError("rolled back")
    [stored] = await _events(database)
    assert stored == emitted and stored.seq > 0
    assert stored.subject == "referral.business.referral.accepted"
    assert stored.payload == b'{"serviceRequest":"ServiceRequest/sr1","score":2.50}'
    with pytest.raises(ValueError):
        async with database.transaction(write=True) as conn:
            await emit(conn, "bad type>", {}, service="referral")


async def test_sequence_numbers_never_come_back_after_pruning(database: Database) -> None:
    async with database.transaction(write=True) as conn:
        first = await emit(conn, "a.b", {}, service="referral")
        await conn.execute(update(outbox).values(published_at=1))
    async with database.transaction(write=True) as conn:
        await conn.execute(outbox.delete())
        second = await emit(conn, "a.b", {}, service="referral")
    assert second.seq > first.seq


def test_subject_filters_follow_nats_wildcards() -> None:
    assert subject_matches("referral.>", "referral.ServiceRequest.create")
    assert subject_matches("referral.business.>", "referral.business.referral.accepted")
    assert subject_matches("*.Observation.create", "results-sharing.Observation.create")
    assert not subject_matches("*.Observation.create", "results-sharing.Observation.update")
    assert not subject_matches("referral.>", "referral")
    assert not subject_matches("referral.*", "referral.ServiceRequest.create")
    assert subject_matches("referral.ServiceRequest.create", "referral.ServiceRequest.create")


def test_the_nats_message_carries_the_event_byte_for_byte() -> None:
    event = Event(
        id="0b5f7c1e-0000-4000-8000-000000000001",
        seq=42,
        service="results-sharing",
        kind="resource",
        type="update",
        occurred_at=1_700_000_000_000_001,
        resource_type="Observation",
        resource_id="o-1",
        version_id=3,
        owner="Organization/lab",
        request_id="req-1",
        payload=b'{"value":1.50}',
    )
    assert event_from_message(message_headers(event), event.payload or b"") == event
    deleted = Event(
        id="x",
        seq=1,
        service="s",
        kind="resource",
        type="delete",
        occurred_at=1,
        resource_type="Patient",
        resource_id="p",
        version_id=2,
        request_id="bad\nid",
    )
    decoded = event_from_message(message_headers(deleted), b"")
    assert decoded.payload is None and decoded.request_id is None
    with pytest.raises(KeyError):
        event_from_message({"Nats-Msg-Id": "x"}, b"{}")


class AcceptingHooks:
    """Business rules that announce what a write means, in the write's transaction."""

    async def before_write(self, repo: Repository, resource: dict[str, Any] | None, context: WriteContext) -> None:
        return None

    async def after_write(self, repo: Repository, resource: dict[str, Any] | None, context: WriteContext) -> None:
        if resource is not None and resource.get("active"):
            await emit(repo.conn, "patient.activated", {"id": context.resource_id}, service="directory")


async def test_a_business_event_emitted_by_a_hook_follows_the_change_it_explains(database: Database) -> None:
    store = _store(database, {"Patient": AcceptingHooks()})
    async with database.transaction(write=True) as conn:
        await Repository(conn, store).create({"resourceType": "Patient", "active": True}, resource_id="a1")
    assert [event.subject for event in await _events(database)] == [
        "directory.Patient.create",
        "directory.business.patient.activated",
    ]


async def _plan(database: Database, statement: Any) -> str:
    async with database.transaction(write=False) as conn:
        sql = str(statement.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
        explain = "EXPLAIN " if database.dialect == "postgresql" else "EXPLAIN QUERY PLAN "
        return "\n".join(" ".join(str(c) for c in row) for row in await conn.exec_driver_sql(explain + sql))


async def test_the_dispatcher_finds_pending_rows_through_their_index_not_past_published_ones(
    database: Database,
) -> None:
    """Statistics taken while every row was pending (a bulk load, autovacuum not yet round),
    then all but the last five published: the read must still go straight to those five. Ordered
    by `seq` alone, PostgreSQL walked the primary key past every published row."""
    rows = [{"event_id": f"e{i}", "service": "referral", "kind": "business", "event_type": "a.b",
             "occurred_at": i} for i in range(3000)]
    async with database.transaction(write=True) as conn:
        await conn.execute(outbox.insert(), rows)
    async with database.engine.connect() as conn:
        await conn.execute(text("ANALYZE servicekit_outbox"))
        await conn.commit()
    async with database.transaction(write=True) as conn:
        await conn.execute(update(outbox).where(outbox.c.occurred_at < 2995).values(published_at=1))

    statement = pending_statement("referral", 200)
    plan = await _plan(database, statement)
    assert "ix_servicekit_outbox_service_published_at_seq" in plan
    assert "pk_servicekit_outbox" not in plan and "Sort" not in plan and "TEMP B-TREE" not in plan
    async with database.transaction(write=False) as conn:
        pending = [row.event_id for row in await conn.execute(statement)]
    assert pending == [f"e{i}" for i in range(2995, 3000)]


class OptOutHooks:
    """A service whose after_write adds rows of its own (here: an opt-out per Patient written),
    with `driver.insert_rows` as the results service adds its recognition rows; `fail` makes it
    fail after its rows are written."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.events_before_own_rows: list[int] = []

    async def before_write(self, repo: Repository, resource: dict[str, Any] | None, context: WriteContext) -> None:
        return None

    async def after_write(self, repo: Repository, resource: dict[str, Any] | None, context: WriteContext) -> None:
        # Through SQLAlchemy, past the driver: what is in the table before the hook's own insert.
        self.events_before_own_rows.append(await repo.conn.scalar(select(func.count()).select_from(outbox)))
        await driver.insert_rows(repo.conn, access_opt_out, [
            {"consent_id": f"c-{context.resource_id}", "patient_id": context.resource_id, "recorded_at": 1}])
        if self.fail:
            raise RuntimeError("the service's rule failed after its rows")


async def test_the_event_row_goes_with_the_services_own_rows_in_one_statement(database: Database) -> None:
    """PostgreSQL: the outbox row waits for the hook's insert and goes in the same statement (one
    round trip fewer per write); SQLite writes it at once. Either way both rows commit."""
    hooks = OptOutHooks()
    async with database.transaction(write=True) as conn:
        await Repository(conn, _store(database, {"Patient": hooks})).create(
            {"resourceType": "Patient", "active": True}, resource_id="p1")
    assert hooks.events_before_own_rows == [0 if database.dialect == "postgresql" else 1]
    assert [e.reference for e in await _events(database)] == ["Patient/p1"]
    assert await count(database, "fhir_access_opt_out", "patient_id = 'p1'") == 1


async def test_an_event_row_left_waiting_is_written_when_the_write_ends(database: Database) -> None:
    """No later insert to go with: the row is written as the hooks return, and precedes what
    the same transaction writes next."""
    async with database.transaction(write=True) as conn:
        repo = Repository(conn, _store(database))
        await repo.create({"resourceType": "Patient", "active": True}, resource_id="p1")
        await emit(conn, "patient.checked", {}, service="directory")
        await repo.create({"resourceType": "Patient", "active": True}, resource_id="p2")
    assert [e.subject for e in await _events(database)] == [
        "directory.Patient.create", "directory.business.patient.checked", "directory.Patient.create"]


async def test_a_failed_hook_leaves_no_waiting_row_for_the_next_transaction(database: Database) -> None:
    """The failed write's event row never reaches the database, not even with a later
    transaction's insert on the same pooled connection."""
    with pytest.raises(RuntimeError):
        async with database.transaction(write=True) as conn:
            await driver.insert_rows(conn, access_opt_out, [{"consent_id": "c0", "patient_id": "x", "recorded_at": 1}])
            async with driver.gathering(conn):
                await driver.insert_later(conn, outbox, [_event_row("lost")])
                raise RuntimeError("the hook failed")
    for n in range(3):  # the pool hands back the connection just returned
        async with database.transaction(write=True) as conn:
            await driver.insert_rows(conn, access_opt_out, [{"consent_id": f"c{n}", "patient_id": "x", "recorded_at": 1}])
    assert await count(database, "servicekit_outbox") == 0
    assert await count(database, "fhir_access_opt_out") == 3
    with pytest.raises(RuntimeError):
        async with database.transaction(write=True) as conn:
            await Repository(conn, _store(database, {"Patient": OptOutHooks(fail=True)})).create(
                {"resourceType": "Patient"}, resource_id="failed")
    async with database.transaction(write=True) as conn:
        await Repository(conn, _store(database)).create({"resourceType": "Patient"}, resource_id="after")
    assert [e.reference for e in await _events(database)] == ["Patient/after"]


def _event_row(resource_id: str) -> dict[str, Any]:
    from servicekit.events.envelope import row_values

    return row_values(Event(id=f"e-{resource_id}", seq=0, service="directory", kind="resource", type="create",
                            occurred_at=1, resource_type="Patient", resource_id=resource_id, version_id=1,
                            owner=None, request_id=None, payload=b"{}"))

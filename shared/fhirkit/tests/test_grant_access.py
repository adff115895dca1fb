"""`grant_access` on several targets of one patient: one row per target and source; granting
again moves the expiry of those held and adds only the new ones."""


from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from fhirkit.access import grant_access
from fhirkit.store.tables import access_grant
from servicekit.db import Database

HOUR = 3600 * 1_000_000
NOW = 1_800_000_000_000_000
GRANT = {"grantee": "Organization/thc-xikou", "patient": "Patient/p1", "scope": "results",
         "source": "recognition-check#Organization/thc-xikou", "reason": "$recognition-check"}


async def _grants(database: Database) -> list[tuple[object, ...]]:
    async with database.transaction(write=False) as conn:
        return await _grants_in(conn)


async def _grants_in(conn: AsyncConnection) -> list[tuple[object, ...]]:
    rows = await conn.execute(select(access_grant.c.source, access_grant.c.target_type, access_grant.c.target_id,
                                     access_grant.c.expires_at, access_grant.c.created_at, access_grant.c.patient_id)
                              .order_by(access_grant.c.gid))
    return [tuple(row) for row in rows]


async def test_several_targets_are_granted_once_each_and_granting_again_extends_them(database: Database) -> None:
    first = [("Observation", "o1"), ("DiagnosticReport", "r1"), ("Observation", "o1")]  # o1 named twice
    async with database.transaction(write=True) as conn:
        await grant_access(conn, **GRANT, targets=first, expires_at=NOW + HOUR, now=NOW)
    source = GRANT["source"]
    assert await _grants(database) == [
        (source, "Observation", "o1", NOW + HOUR, NOW, "p1"), (source, "DiagnosticReport", "r1", NOW + HOUR, NOW, "p1")]

    later = NOW + 10 * HOUR
    async with database.transaction(write=True) as conn:
        await grant_access(conn, **GRANT, targets=[("Observation", "o2"), ("Observation", "o1")],
                              expires_at=later + HOUR, now=later)
    assert await _grants(database) == [
        (source, "Observation", "o1", later + HOUR, NOW, "p1"),  # extended, not added again
        (source, "DiagnosticReport", "r1", NOW + HOUR, NOW, "p1"),  # not named this time: unchanged
        (source, "Observation", "o2", later + HOUR, later, "p1"),
    ]


async def test_a_whole_patient_grant_and_another_sources_grant_are_rows_of_their_own(database: Database) -> None:
    async with database.transaction(write=True) as conn:
        await grant_access(conn, **GRANT, targets=[("Observation", "o1")], expires_at=NOW + HOUR, now=NOW)
        await grant_access(conn, **GRANT, expires_at=None, now=NOW)  # no target: all of the patient's results
        await grant_access(conn, **{**GRANT, "source": "ServiceRequest/sr1"}, expires_at=NOW + HOUR, now=NOW,
                           targets=[("Observation", "o1")])
        await grant_access(conn, **GRANT, expires_at=None, now=NOW + 1)  # the same again: nothing changes
    rows = await _grants(database)
    assert [(row[0], row[1], row[3]) for row in rows] == [
        (GRANT["source"], "Observation", NOW + HOUR), (GRANT["source"], None, None),
        ("ServiceRequest/sr1", "Observation", NOW + HOUR)]


async def test_granting_again_within_renew_within_leaves_the_expiry_but_a_later_or_shorter_one_moves_it(
        database: Database) -> None:
    minute = 60 * 1_000_000
    target = [("Observation", "o1")]
    async with database.transaction(write=True) as conn:
        await grant_access(conn, **GRANT, targets=target, expires_at=NOW + HOUR, now=NOW, renew_within=minute)
    async with database.transaction(write=True) as conn:  # the check repeated 59 s later
        await grant_access(conn, **GRANT, targets=target, expires_at=NOW + HOUR + minute - 1_000_000,
                           now=NOW + minute - 1_000_000, renew_within=minute)
    assert [row[3] for row in await _grants(database)] == [NOW + HOUR]
    async with database.transaction(write=True) as conn:  # a minute later: renewed
        await grant_access(conn, **GRANT, targets=target, expires_at=NOW + HOUR + minute, now=NOW + minute,
                           renew_within=minute)
    assert [row[3] for row in await _grants(database)] == [NOW + HOUR + minute]
    async with database.transaction(write=True) as conn:  # a shorter expiry applies however close
        await grant_access(conn, **GRANT, targets=target, expires_at=NOW + HOUR + minute - 1, now=NOW + minute,
                           renew_within=minute)
    assert [row[3] for row in await _grants(database)] == [NOW + HOUR + minute - 1]
    async with database.transaction(write=True) as conn:  # until revoked, then back to an expiry
        await grant_access(conn, **GRANT, targets=target, expires_at=None, now=NOW + minute, renew_within=minute)
        assert [row[3] for row in await _grants_in(conn)] == [None]
        await grant_access(conn, **GRANT, targets=target, expires_at=NOW + HOUR, now=NOW + minute, renew_within=minute)
    assert [row[3] for row in await _grants(database)] == [NOW + HOUR]


async def test_only_inserts_and_an_update_together_open_a_transaction(database: Database) -> None:
    """A `$recognition-check` looks its grants up outside a transaction (`reads_then_writes`) and
    opens one (`writing`) only for writes of two statements: new grants alone are one insert, held
    ones with the same expiry nothing at all."""
    entered: list[str] = []
    minute = 60 * 1_000_000
    async with database.reads_then_writes() as conn:

        def writing() -> Any:
            entered.append("writing")
            return database.writing(conn)

        two = [("Observation", "o1"), ("Observation", "o2")]
        await grant_access(conn, **GRANT, targets=two, expires_at=NOW + HOUR, now=NOW, writing=writing)
        assert entered == []  # one insert
        # On PostgreSQL that insert committed on its own: another connection sees it while this
        # one is still out.
        if not database.url.startswith("sqlite"):
            assert [row[1:4] for row in await _grants(database)] == [
                ("Observation", "o1", NOW + HOUR), ("Observation", "o2", NOW + HOUR)]
        await grant_access(conn, **GRANT, targets=two, expires_at=NOW + HOUR, now=NOW, writing=writing,
                           renew_within=minute)
        assert entered == []  # held with the same expiry: nothing to write
        three = [*two, ("Observation", "o3")]
        await grant_access(conn, **GRANT, targets=three, expires_at=NOW + 2 * HOUR, now=NOW + HOUR,
                           writing=writing, renew_within=minute)
        assert entered == ["writing"]  # two extended and one new: an update and an insert, together
    assert [row[1:4] for row in await _grants(database)] == [
        ("Observation", "o1", NOW + 2 * HOUR), ("Observation", "o2", NOW + 2 * HOUR),
        ("Observation", "o3", NOW + 2 * HOUR)]


async def test_writes_on_a_reads_then_writes_connection_fail_whole(database: Database) -> None:
    """An error inside `writing` rolls back every write made in it: nothing half-written."""
    with pytest.raises(RuntimeError):
        async with database.reads_then_writes() as conn:
            async with database.writing(conn):
                await grant_access(conn, **GRANT, targets=[("Observation", "o1")], expires_at=NOW + HOUR, now=NOW)
                assert len(await _grants_in(conn)) == 1
                raise RuntimeError("the second write failed")
    assert await _grants(database) == []
    async with database.reads_then_writes() as conn:  # the connection went back to the pool usable
        await grant_access(conn, **GRANT, targets=[("Observation", "o2")], expires_at=NOW + HOUR, now=NOW,
                           writing=lambda: database.writing(conn))
    assert [row[2] for row in await _grants(database)] == ["o2"]

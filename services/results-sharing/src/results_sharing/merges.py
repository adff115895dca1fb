"""Following the directory's patient merges (`Patient/$merge`): a merged-away record's results are
the surviving record's, for `$recognition-check`, for grants and for search.

The directory owns patients; this service learns of a merge from the directory's Patient events
(`directory.Patient.update`, in-process bus or NATS): the merged-away record's new version carries
`link` `replaced-by` the survivor. The consumer keeps `results_patient_merge` (merged id → the
surviving id at the end of the chain of merges) and, in the same transaction, adds **alias rows**
to the engine's reference index: for every stored resource referring to the merged-away patient,
one more `fhir_reference_index` row with the same parameter pointing at the survivor. So:

* `Observation?patient=Patient/<survivor>` (and `subject=`, chains, `_has`) finds them, through the
  engine's ordinary search, with no change to its code;
* grants (fhirkit.access matches a grant's patient against the resource's Patient reference rows)
  made for the survivor open them: a referral or a recognition check for the survivor;
* `$recognition-check` reads its own index by patient id: it asks for the survivor and every
  record merged into it (`same_person`).

Why alias rows and not a rewrite of the stored results (a new version with `subject` changed and
a Provenance): the results stay exactly as their producers wrote them (a read returns what the
center sent, its ETag does not move under it, a re-send by identifier from the center's LIS, which
still knows the old patient id, neither conflicts nor reverts anything), a merge costs one
INSERT … SELECT instead of one new version per result, and the merge is undone-able in principle by
deleting rows. The engine rebuilds a resource's index rows on each of its writes, so a trigger on
the reference index (migration `results_sharing_0005_trigger`) adds the alias row of every
row written to a merged-away patient, in the same statement: no extra round trip per write.

Alias rows are the reference rows this module writes with no `url`: every row the engine writes
carries the reference text there. A merge is never undone by the directory (no unmerge); a
grant made for the merged-away record still opens only what is stored under that record.
"""

from typing import Any

from fastapi import FastAPI
from sqlalchemy import (
    CTE,
    bindparam,
    delete,
    exists,
    false,
    func,
    insert,
    literal,
    select,
    text,
    true,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from fhirkit.store import driver
from fhirkit.store.tables import reference_index
from results_sharing import db
from servicekit.events import Event

CONSUMER = "results-sharing-patient-merges"
SUBJECT = "directory.Patient.*"
MAX_CHAIN = 8  # merges of merges followed when a survivor was itself merged away later


def replaced_by(patient: dict[str, Any]) -> str | None:
    """The id of the record a merged-away Patient was merged into, or None."""
    for link in patient.get("link") or []:
        reference = (link.get("other") or {}).get("reference") if isinstance(link, dict) else None
        if link.get("type") == "replaced-by" and isinstance(reference, str) and reference.startswith("Patient/"):
            return reference.split("/", 1)[1]
    return None


# --- reading: who is the same person ------------------------------------------------------------

def _survivor_of(patient: Any) -> Any:
    """The record `patient` (a bound parameter or an SQL expression) was merged into, if it was."""
    return select(db.patient_merge.c.survivor_id).where(db.patient_merge.c.merged_id == patient)


_SURVIVOR = _survivor_of(bindparam("patient_id"))


def same_person(patient: Any) -> CTE:
    """The records of one person, as a CTE of (`patient_id`, `survivor`): the record `patient` (a
    bound parameter) lives on as (itself unless it was merged away; `survivor` true) and every
    record merged into that one. The table keeps each chain flattened: a merged id points at the
    last survivor. A CTE so that `$recognition-check` reads the person and their results in one
    statement."""
    table = db.patient_merge
    lives_on = select(func.coalesce(_survivor_of(patient).scalar_subquery(), patient).label("survivor_id")).cte(
        "lives_on")
    merged_into = (select(table.c.merged_id, false())
                   .join_from(table, lives_on, table.c.survivor_id == lives_on.c.survivor_id))
    return select(lives_on.c.survivor_id.label("patient_id"), true().label("survivor")).union_all(
        merged_into).cte("same_person")


# --- writing: a merge arrives -------------------------------------------------------------------

async def apply_patient_event(event: Event, conn: AsyncConnection) -> None:
    """Consumer of the directory's Patient events: record a merge when a version says replaced-by."""
    if event.resource_id is None or not event.payload or event.type == "delete":
        return
    survivor = replaced_by(event.json())
    if survivor is not None and survivor != event.resource_id:
        await record_merge(conn, event.resource_id, survivor, event.occurred_at)


async def record_merge(conn: AsyncConnection, merged_id: str, survivor_id: str, now: int) -> None:
    """`merged_id` now lives on as `survivor_id`: idempotent, so a redelivered event changes nothing."""
    final = await _end_of_chain(conn, survivor_id)
    if final == merged_id:
        return  # a cycle (A → B then B → A) would hide both records: keep what we had
    await _wait_for_writers(conn)
    table = db.patient_merge
    # Earlier merges into the merged-away record now point at the final survivor too (flattened).
    await conn.execute(update(table).where(table.c.survivor_id == merged_id).values(survivor_id=final))
    if (await conn.execute(_SURVIVOR, {"patient_id": merged_id})).first() is None:
        await conn.execute(insert(table).values(merged_id=merged_id, survivor_id=final, merged_at=now))
    else:
        await conn.execute(update(table).where(table.c.merged_id == merged_id).values(survivor_id=final))
    await _alias_references(conn, merged_id, final)


async def _wait_for_writers(conn: AsyncConnection) -> None:
    """Close the race between a merge and a write of the merged-away patient's result.

    A write that began before the merge row is committed adds no alias row (it saw no merge), and
    on PostgreSQL the backfill below would not see its index rows either if it ran before that
    write committed. SHARE mode waits for every transaction that is writing index rows and holds
    new ones until the merge commits, after which the alias trigger sees it. Merges are rare and this
    lasts one statement's time. SQLite runs write transactions one at a time already."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text(f"LOCK TABLE {reference_index.name} IN SHARE MODE"))


async def _end_of_chain(conn: AsyncConnection, patient_id: str) -> str:
    current = patient_id
    for _ in range(MAX_CHAIN):
        found = await driver.execute(conn, _SURVIVOR, {"patient_id": current})
        following = found[0][0] if found else current
        if following == current:
            break
        current = following
    return current


async def _alias_references(conn: AsyncConnection, merged_id: str, survivor_id: str) -> None:
    """Every resource referring to the merged-away patient (directly, or through an alias row of an
    earlier merge) also refers to the survivor; the alias rows to the merged-away id go."""
    ref, present = reference_index, reference_index.alias()
    already = exists(select(present.c.rid).where(
        present.c.rid == ref.c.rid, present.c.param == ref.c.param,
        present.c.target_type == "Patient", present.c.target_id == survivor_id))
    rows = (select(ref.c.rid, ref.c.resource_type, ref.c.param, literal("Patient"), literal(survivor_id))
            .where(ref.c.target_type == "Patient", ref.c.target_id == merged_id, ~already)
            .distinct())
    columns = ["rid", "resource_type", "param", "target_type", "target_id"]
    await conn.execute(insert(reference_index).from_select(columns, rows))
    await conn.execute(delete(reference_index).where(
        reference_index.c.target_type == "Patient", reference_index.c.target_id == merged_id,
        reference_index.c.url.is_(None)))


async def subscribe(app: FastAPI) -> None:
    """Start-up hook: follow the directory's merges (a new NATS consumer catches up on the stream)."""
    await app.state.events.subscribe(CONSUMER, SUBJECT, apply_patient_event)


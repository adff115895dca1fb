"""Recomputing the date index from the stored JSON, for when the reading of zone-less dates changes.

A date, or a dateTime without a zone, is indexed as an instant range in the deployment's zone
(`ALLIANCE_TIME_ZONE`). The fhirkit migration 0005 ran this once when the zone became
configurable; `alliance reindex-dates` runs it again after the zone is changed on a database that
holds data. Synchronous (Alembic's connection or a plain engine), in batches of rids.
"""

import sqlalchemy as sa

from fhirkit import jsonio
from fhirkit.search import values
from fhirkit.store.indexing import index_rows
from fhirkit.store.tables import date_index, resource

BATCH = 500


def recompute_date_index(connection: sa.Connection, zone: str) -> int:
    """Rebuilds the date rows of every current resource that has some, reading zone-less values
    in `zone`; returns how many resources were reindexed. The process's own reading of dates is
    restored afterwards."""
    previous = values.local_time_zone()
    values.set_local_time_zone(zone)
    done, last = 0, 0
    try:
        while batch := _next_batch(connection, last):
            rids = [rid for rid, _ in batch]
            connection.execute(sa.delete(date_index).where(date_index.c.rid.in_(rids)))
            rows = [{"rid": rid, **row} for rid, content in batch
                    for row in index_rows(jsonio.loads(content), frozenset({"date"}))["date"]]
            if rows:
                connection.execute(sa.insert(date_index), rows)
            done, last = done + len(batch), rids[-1]
    finally:
        values.set_local_time_zone(previous)
    return done


def _next_batch(connection: sa.Connection, after: int) -> list[tuple[int, bytes]]:
    """Current resources with date index rows (only they can hold a date), in rid order."""
    indexed = sa.select(date_index.c.rid).where(date_index.c.rid > after).distinct()
    stmt = (
        sa.select(resource.c.rid, resource.c.content)
        .where(resource.c.rid.in_(indexed), resource.c.deleted == sa.false(), resource.c.content.is_not(None))
        .order_by(resource.c.rid)
        .limit(BATCH)
    )
    return [(row[0], bytes(row[1])) for row in connection.execute(stmt)]

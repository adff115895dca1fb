"""Where a pack went: the links no R4 search parameter indexes, kept in one table of our own.

A pack's load (`Procedure.subject` → contained Group), its deliveries
(`SupplyDelivery.suppliedItem.itemReference`) and its uses (`Procedure.focalDevice.manipulated`)
are elements the engine does not index, so a recall could only find them by reading every
Procedure and SupplyDelivery. Each row here is one such link, written by the store hooks in the
same transaction as the resource that states it and replaced whenever that resource changes, so
the table always says what the current versions say.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, Column, Index, String, Table, delete, insert, select

from fhirkit.store.tables import RowId
from results_sharing.db import METADATA

LOAD, DELIVERY, USE = "load", "delivery", "use"
CHUNK = 500  # bound on an IN list

trace_link = Table(
    "sterile_trace_link",
    METADATA,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),  # load | delivery | use
    Column("source_type", String(64), nullable=False),  # the resource stating the link
    Column("source_id", String(64), nullable=False),
    Column("pack_id", String(64), nullable=False),
    Column("sterilizer_id", String(64), nullable=True),  # load: the sterilizer of the cycle
    Column("organization", String(128), nullable=True),  # delivery: receiver; use: the using site
    Column("patient", String(128), nullable=True),  # use: Patient/id
    Column("occurred", BigInteger, nullable=True),  # load: cycle start; delivery/use: when (µs)
    Index(None, "pack_id", "kind"),
    Index(None, "source_type", "source_id"),
    Index(None, "sterilizer_id", "occurred"),
)


@dataclass(frozen=True)
class Link:
    kind: str
    source_type: str
    source_id: str
    pack_id: str
    sterilizer_id: str | None = None
    organization: str | None = None
    patient: str | None = None
    occurred: int | None = None

    @property
    def source(self) -> str:
        return f"{self.source_type}/{self.source_id}"


async def replace(conn: Any, source_type: str, source_id: str, links: Iterable[Link]) -> None:
    """The links stated by one resource, as its current version states them (none once deleted)."""
    await conn.execute(
        delete(trace_link).where(trace_link.c.source_type == source_type, trace_link.c.source_id == source_id)
    )
    rows = [link.__dict__ for link in links]
    if rows:
        await conn.execute(insert(trace_link), rows)


async def of_packs(conn: Any, pack_ids: Iterable[str], kinds: Iterable[str]) -> list[Link]:
    ids, wanted = sorted(set(pack_ids)), list(kinds)
    found: list[Link] = []
    for start in range(0, len(ids), CHUNK):
        stmt = select(trace_link).where(
            trace_link.c.pack_id.in_(ids[start:start + CHUNK]), trace_link.c.kind.in_(wanted)
        ).order_by(trace_link.c.occurred, trace_link.c.id)
        found += [_link(row) for row in await conn.execute(stmt)]
    return found


async def loads_since(conn: Any, sterilizer_id: str, after: int | None) -> list[Link]:
    """Every pack a sterilizer sterilized in cycles that started after `after` (all if None)."""
    stmt = select(trace_link).where(trace_link.c.kind == LOAD, trace_link.c.sterilizer_id == sterilizer_id)
    if after is not None:
        stmt = stmt.where(trace_link.c.occurred > after)
    return [_link(row) for row in await conn.execute(stmt.order_by(trace_link.c.occurred, trace_link.c.id))]


def _link(row: Any) -> Link:
    m = row._mapping
    return Link(m["kind"], m["source_type"], m["source_id"], m["pack_id"], m["sterilizer_id"], m["organization"],
                m["patient"], m["occurred"])


__all__ = ["DELIVERY", "LOAD", "USE", "Link", "loads_since", "of_packs", "replace", "trace_link"]

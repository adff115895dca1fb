"""The audit trail is append-only and tamper-evident: a hash chain over the stored AuditEvents.

Each AuditEvent the gateway writes gets a link: the SHA-256 of its stored bytes, and the chain
hash `SHA-256(previous chain hash ‖ content hash)`. Changing, removing or reordering any stored
AuditEvent breaks every later link, which `alliance audit verify` reports with the first broken
sequence number. Links are appended in the audit writer's transaction, after taking a lock that
every appender takes before reading the last link, so concurrent writers (several worker
processes, each batching its own notes, and gateway replicas) extend one chain, never fork it:
on PostgreSQL a transaction-scoped advisory lock; on SQLite the write transaction itself, which
begins with BEGIN IMMEDIATE (servicekit.db) and so holds the database's one write lock, across
processes, from before its first read.
"""

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, Column, Integer, String, Table, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from fhirkit.errors import Forbidden
from fhirkit.store import driver
from fhirkit.store.tables import resource
from gateway.auth.clients import METADATA

GENESIS = "0" * 64
CHAIN_LOCK = 0x41554454  # "AUDT": the advisory lock serialising chain appends on PostgreSQL

audit_chain = Table(
    "gateway_audit_chain",
    METADATA,
    Column("seq", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    Column("audit_id", String(64), nullable=False, unique=True),
    Column("content_sha256", String(64), nullable=False),
    Column("chain_sha256", String(64), nullable=False),
)


def link(previous: str, content: bytes) -> tuple[str, str]:
    content_hash = hashlib.sha256(content).hexdigest()
    return content_hash, hashlib.sha256(f"{previous}{content_hash}".encode("ascii")).hexdigest()


async def append(conn: AsyncConnection, records: Sequence[tuple[str, bytes]]) -> None:
    """Chain the AuditEvents just stored (id, stored bytes), in order, in the caller's transaction.

    The links go in one multi-row statement. Their sequence numbers are given, not drawn from the
    column's sequence: under the lock the next number is known, and a multi-row insert promises
    no order in which it would draw them."""
    if not records:
        return
    if conn.dialect.name == "postgresql":  # SQLite: already the only writer (see above)
        await conn.execute(select(func.pg_advisory_xact_lock(CHAIN_LOCK)))
    last = (await conn.execute(
        select(audit_chain.c.seq, audit_chain.c.chain_sha256).order_by(audit_chain.c.seq.desc()).limit(1))).first()
    seq, previous = (last[0], last[1]) if last else (0, GENESIS)
    rows = []
    for audit_id, content in records:
        content_hash, previous = link(previous, content)
        seq += 1
        rows.append({"seq": seq, "audit_id": audit_id, "content_sha256": content_hash, "chain_sha256": previous})
    await driver.insert_rows(conn, audit_chain, rows)


@dataclass(frozen=True)
class Verdict:
    checked: int
    broken_at: int | None = None  # the first sequence number whose link does not hold
    problem: str | None = None


async def verify(conn: AsyncConnection, batch: int = 5000) -> Verdict:
    """Walk the chain from the start, recomputing every link from the stored AuditEvent bytes."""
    previous, checked, after = GENESIS, 0, 0
    while True:
        stmt = (  # an AuditEvent's one version is its resource row (append-only: no history row)
            select(audit_chain.c.seq, audit_chain.c.audit_id, audit_chain.c.content_sha256,
                   audit_chain.c.chain_sha256, resource.c.content)
            .outerjoin(resource, (resource.c.resource_type == "AuditEvent")
                       & (resource.c.resource_id == audit_chain.c.audit_id))
            .where(audit_chain.c.seq > after).order_by(audit_chain.c.seq).limit(batch)
        )
        rows = list(await conn.execute(stmt))
        if not rows:
            return Verdict(checked)
        for seq, audit_id, content_hash, chain_hash, content in rows:
            if content is None:
                return Verdict(checked, seq, f"AuditEvent/{audit_id} is missing")
            expected_content, expected_chain = link(previous, content)
            if expected_content != content_hash:
                return Verdict(checked, seq, f"AuditEvent/{audit_id} was changed after it was written")
            if expected_chain != chain_hash:
                return Verdict(checked, seq, f"the chain is broken before AuditEvent/{audit_id} (removed or reordered)")
            previous, checked, after = chain_hash, checked + 1, seq


class AuditEventHooks:
    """AuditEvents other systems send (IHE ATNA: the alliance is their audit repository) are
    appended and chained like the gateway's own; none is ever changed or deleted."""

    async def before_write(self, repo: Any, resource: dict[str, Any] | None, context: Any) -> None:
        if context.previous is not None or resource is None:
            raise Forbidden(f"AuditEvent/{context.resource_id} cannot change: the audit trail is append-only")

    async def after_write(self, repo: Any, resource: dict[str, Any] | None, context: Any) -> None:
        stored = await repo.unrestricted().read("AuditEvent", context.resource_id)
        await append(repo.conn, [(stored.resource_id, stored.content)])

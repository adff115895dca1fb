"""Failed client authentications at the token endpoint, and the temporary lockouts they lead to.

Counted per claimed client id and per source address in the platform database, so that every
gateway process (workers, replicas) sees the same counts: `max_failures` failures within
`window_seconds` lock that key for `lockout_seconds`. While a key is locked the token endpoint
answers 429 without checking credentials, so a correct secret does not end the lockout early.

The per-client limit is also a way for anyone who knows a client id to lock that client out for a
while; the thresholds trade that against slowing down guessing (docs/security.md).
"""

import hashlib
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    String,
    Table,
    and_,
    case,
    delete,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from gateway.auth.clients import METADATA

gateway_auth_failure = Table(
    "gateway_auth_failure",
    METADATA,
    Column("key", String(200), primary_key=True),  # "client:<id>" or "address:<ip>"
    Column("failures", Integer, nullable=False),
    Column("window_start_ms", BigInteger, nullable=False),
    Column("locked_until_ms", BigInteger, nullable=True),
    Index(None, "window_start_ms"),
)

_PLAIN_KEY = re.compile(r"^[A-Za-z0-9._~:\-\[\]]{1,150}$")


@dataclass(frozen=True, kw_only=True)
class LockoutPolicy:
    window_seconds: int = 900
    max_failures_per_client: int = 5  # 0: no limit
    max_failures_per_address: int = 50  # 0: no limit
    lockout_seconds: int = 900
    clock: Callable[[], float] = field(default=time.time, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.window_seconds <= 0 or self.lockout_seconds <= 0:
            raise ValueError("window_seconds and lockout_seconds must be positive")
        if self.max_failures_per_client < 0 or self.max_failures_per_address < 0:
            raise ValueError("failure limits must be 0 (off) or positive")

    def limits(self, client_id: str | None, address: str | None) -> list[tuple[str, int]]:
        """The counters a request from this client and address touches, with their limits."""
        keys = []
        if client_id and self.max_failures_per_client:
            keys.append((counter_key("client", client_id), self.max_failures_per_client))
        if address and self.max_failures_per_address:
            keys.append((counter_key("address", address), self.max_failures_per_address))
        return keys


def counter_key(kind: str, value: str) -> str:
    # Claimed client ids are attacker input: anything unusual is hashed to bound and neutralize it.
    if _PLAIN_KEY.match(value):
        return f"{kind}:{value}"
    return f"{kind}#{hashlib.sha256(value.encode('utf-8', 'surrogatepass')).hexdigest()}"


def _now_ms(policy: LockoutPolicy) -> int:
    return int(policy.clock() * 1000)


async def locked_for(engine: AsyncEngine, policy: LockoutPolicy, keys: Sequence[str]) -> int:
    """Seconds until every one of `keys` is unlocked (0: none is locked)."""
    if not keys:
        return 0
    now = _now_ms(policy)
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(gateway_auth_failure.c.locked_until_ms).where(
                gateway_auth_failure.c.key.in_(list(keys)), gateway_auth_failure.c.locked_until_ms > now
            )
        )
        until = max((row[0] for row in rows), default=now)
    return math.ceil((until - now) / 1000)


async def record_failure(engine: AsyncEngine, policy: LockoutPolicy, limits: Sequence[tuple[str, int]]) -> None:
    if not limits:
        return
    now = _now_ms(policy)
    window_start = now - policy.window_seconds * 1000
    async with engine.begin() as conn:
        for key, limit in limits:
            await _count(conn, key, limit, now, window_start, policy.lockout_seconds * 1000)
        # Counters past their window and lockouts past their end carry nothing worth keeping.
        await conn.execute(
            delete(gateway_auth_failure).where(
                gateway_auth_failure.c.window_start_ms < window_start,
                or_(gateway_auth_failure.c.locked_until_ms.is_(None), gateway_auth_failure.c.locked_until_ms < now),
            )
        )


async def _count(conn: AsyncConnection, key: str, limit: int, now: int, window_start: int, lockout_ms: int) -> None:
    await _ensure_row(conn, key, now)
    table = gateway_auth_failure
    expired = table.c.window_start_ms < window_start
    unlocked = or_(table.c.locked_until_ms.is_(None), table.c.locked_until_ms <= now)
    # One UPDATE evaluated on the current row: concurrent processes cannot lose each other's counts.
    # Failures during a lockout are not counted, so they cannot stretch it.
    await conn.execute(
        update(table)
        .where(table.c.key == key, unlocked)
        .values(
            failures=case((expired, 1), else_=table.c.failures + 1),
            window_start_ms=case((expired, now), else_=table.c.window_start_ms),
        )
    )
    # Reaching the limit starts a lockout and a fresh count for when it ends.
    await conn.execute(
        update(table)
        .where(and_(table.c.key == key, unlocked, table.c.failures >= limit))
        .values(failures=0, window_start_ms=now, locked_until_ms=now + lockout_ms)
    )


async def _ensure_row(conn: AsyncConnection, key: str, now: int) -> None:
    values = {"key": key, "failures": 0, "window_start_ms": now, "locked_until_ms": None}
    dialect = conn.dialect.name
    if dialect in ("postgresql", "sqlite"):
        dialect_insert = pg_insert if dialect == "postgresql" else sqlite_insert
        await conn.execute(dialect_insert(gateway_auth_failure).values(**values).on_conflict_do_nothing())
        return
    try:
        async with conn.begin_nested():
            await conn.execute(insert(gateway_auth_failure).values(**values))
    except IntegrityError:
        pass


async def record_success(engine: AsyncEngine, policy: LockoutPolicy, client_id: str) -> None:
    """A good authentication clears the client's failure count, never an active lockout."""
    if not policy.max_failures_per_client:
        return
    now = _now_ms(policy)
    table = gateway_auth_failure
    async with engine.begin() as conn:
        await conn.execute(
            delete(table).where(
                table.c.key == counter_key("client", client_id),
                or_(table.c.locked_until_ms.is_(None), table.c.locked_until_ms <= now),
            )
        )

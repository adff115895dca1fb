"""Look-ups of tables that change rarely (a recognition catalog, quality records), kept across
requests in this process for a few seconds, on top of the transaction's memo.

Every stored result and every `$recognition-check` asks for its catalog item and its producer's
quality records: two statements each, for rows that change a few times a year. Kept for
`seconds` (5), a change reaches the look-ups of the transaction that made it at once (that
transaction reads the table itself from then on) and every other look-up within `seconds`: the
writing process drops what it kept as the change is made, but another request may read the
old rows again before the change commits, and other workers and replicas are not told.
At most `limit` keys are kept (a client asking for made-up codes must not grow the memory);
past it, the kept answers are dropped and gathered again.
"""

import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from fhirkit.store import driver

_WRITTEN = object()  # in a transaction's memo: this transaction changed the table
_ABSENT = object()


class ReadMostly:
    def __init__(self, name: str, *, seconds: float = 5.0, limit: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.seconds = seconds
        self.limit = limit
        self.clock = clock
        # By database (its URL): one process may serve several (the tests do).
        self._kept: dict[Any, dict[Any, tuple[float, Any]]] = {}
        self._by_engine: weakref.WeakKeyDictionary[Any, dict[Any, tuple[float, Any]]] = weakref.WeakKeyDictionary()

    async def get(self, conn: AsyncConnection, key: Any, load: Callable[[], Awaitable[Any]]) -> Any:
        """`load()`'s answer for `key`: from the transaction's memo, else kept from a recent
        transaction, else loaded (and kept, unless this transaction changed the table)."""
        memo, kept = driver.transaction_memo(conn, self.name), self._kept_for(conn)
        if key not in memo and self._from_kept(memo, kept, key) is _ABSENT:
            self._remember(memo, kept, key, await load())
        return memo[key]

    def missing(self, conn: AsyncConnection, keys: Iterable[Any]) -> set[Any]:
        """The keys neither the transaction's memo nor the recent answers hold; those held are put
        into the memo."""
        memo, kept = driver.transaction_memo(conn, self.name), self._kept_for(conn)
        return {key for key in keys if key not in memo and self._from_kept(memo, kept, key) is _ABSENT}

    def remember(self, conn: AsyncConnection, key: Any, value: Any) -> None:
        """A value loaded for `key` (by a caller that loads many at once)."""
        self._remember(driver.transaction_memo(conn, self.name), self._kept_for(conn), key, value)

    def _kept_for(self, conn: AsyncConnection) -> dict[Any, tuple[float, Any]]:
        # Through the engine first: hashing its URL on every call cost a check 1 % of its CPU.
        kept = self._by_engine.get(conn.sync_engine)
        if kept is None:
            kept = self._by_engine[conn.sync_engine] = self._kept.setdefault(conn.sync_engine.url, {})
        return kept

    def _from_kept(self, memo: dict[Any, Any], kept: dict[Any, tuple[float, Any]], key: Any) -> Any:
        found = None if _WRITTEN in memo else kept.get(key)
        if found is None or self.clock() - found[0] >= self.seconds:
            return _ABSENT
        memo[key] = found[1]
        return found[1]

    def _remember(self, memo: dict[Any, Any], kept: dict[Any, tuple[float, Any]], key: Any, value: Any) -> None:
        memo[key] = value
        if _WRITTEN in memo:
            return  # not committed yet: for this transaction only
        if len(kept) >= self.limit:
            kept.clear()
        kept[key] = (self.clock(), value)

    def changed(self, conn: AsyncConnection) -> None:
        """The table is being changed in `conn`'s transaction: that transaction reads it afresh
        from now on, and this process drops what it kept."""
        memo = driver.transaction_memo(conn, self.name)
        memo.clear()
        memo[_WRITTEN] = True
        self._kept_for(conn).clear()

    def forget(self) -> None:
        """Drop every kept answer, of every database."""
        self._kept.clear()
        self._by_engine.clear()

"""The few typed extension points a service plugs into the engine.

A service's business rules (routing of a referral, the state machine of a Task, the directory's
organization tree) run in `before_write`; `after_write` runs in the same database transaction
(outbox rows, grants). `ReferenceResolver` answers whether a referenced resource exists.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from fhirkit.store.repository import Repository


@dataclass(frozen=True)
class WriteContext:
    interaction: str  # create | update | patch | delete
    resource_type: str
    resource_id: str
    previous: dict[str, Any] | None  # the current version before this write, parsed
    in_transaction: bool = False
    if_match: int | None = None  # the version the client said it saw (If-Match), if it said one
    stored: Any = None  # after the write: the StoredResource written (None before it)


class ResourceHooks(Protocol):
    async def before_write(
        self, repo: "Repository", resource: dict[str, Any] | None, context: WriteContext
    ) -> None: ...

    async def after_write(
        self, repo: "Repository", resource: dict[str, Any] | None, context: WriteContext
    ) -> None: ...


class BatchHooks(ResourceHooks, Protocol):
    """Hooks that can take part in a transaction's run of creates of their type, written together
    (`Repository.create_together`: a hundred lab results cost a few statements, not hundreds):

    1. every body is validated, then `before_creates` sees them all at once, to look up in one
       statement what `before_write` would otherwise ask for each;
    2. `before_write` judges each body in order, against a store that does not yet hold the
       run's earlier bodies: a rule about them (a duplicate identifier) keeps track itself, in
       `repo.batch_memo`;
    3. the rows of every body are written at once, then `after_creates` does each body's
       `after_write` work, in as few statements as it can.

    `creates_together(resource)` says whether a new resource may join such a run; hooks without
    it never do."""

    def creates_together(self, resource: dict[str, Any]) -> bool: ...

    async def before_creates(self, repo: "Repository", resources: list[dict[str, Any]]) -> None: ...

    async def after_creates(
        self, repo: "Repository", resources: list[dict[str, Any]], contexts: list[WriteContext]
    ) -> None: ...


def creates_together(hooks: ResourceHooks, resource: dict[str, Any]) -> bool:
    """Whether `hooks` let this new resource be created in a run with others (see BatchHooks)."""
    joins = getattr(hooks, "creates_together", None)
    return bool(joins(resource)) if joins is not None else False


class NoHooks:
    async def before_write(self, repo: "Repository", resource: dict[str, Any] | None, context: WriteContext) -> None:
        return None

    async def after_write(self, repo: "Repository", resource: dict[str, Any] | None, context: WriteContext) -> None:
        return None

    def creates_together(self, resource: dict[str, Any]) -> bool:
        return True

    async def before_creates(self, repo: "Repository", resources: list[dict[str, Any]]) -> None:
        return None

    async def after_creates(
        self, repo: "Repository", resources: list[dict[str, Any]], contexts: list[WriteContext]
    ) -> None:
        return None


class ReferenceResolver(Protocol):
    def holds(self, resource_type: str) -> bool:
        """Whether the product stores this type at all (references to other types are kept as they are)."""

    async def exists(self, resource_type: str, resource_id: str) -> bool:
        """Whether another service holds this resource, live (not deleted)."""


class NoForeignTypes:
    def holds(self, resource_type: str) -> bool:
        return False

    async def exists(self, resource_type: str, resource_id: str) -> bool:
        return False

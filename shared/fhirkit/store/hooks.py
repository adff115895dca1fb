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


class NoHooks:
    async def before_write(self, repo: "Repository", resource: dict[str, Any] | None, context: WriteContext) -> None:
        return None

    async def after_write(self, repo: "Repository", resource: dict[str, Any] | None, context: WriteContext) -> None:
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

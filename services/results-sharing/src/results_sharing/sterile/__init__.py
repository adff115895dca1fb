"""Sterile supply traceability (消毒供应追溯, WS 310): packs, cycles, monitoring, distribution,
use on patients, the automatic recall on a failed biological indicator and `Device/$trace`.

The contract is docs/sterile-supply.md. `fhir.py` plugs this package in with three names:
`with_sterile_supply` (store hooks), `OPERATIONS` and `publish_code_systems` (start-up).
"""

from typing import Any

from fhirkit.errors import VersionConflict
from fhirkit.store.repository import Repository
from results_sharing.sterile import codes, trace
from results_sharing.sterile.hooks import with_sterile_supply

OPERATIONS = [trace.OPERATION]


async def publish_code_systems(app: Any) -> None:
    """Serve the CodeSystems this package defines; rewriting an identical one creates no version."""
    service = app.state.service
    async with app.state.database.transaction(write=True) as conn:
        repo = Repository(conn, service.store)
        for code_system in codes.code_systems():
            try:
                await repo.update("CodeSystem", code_system["id"], code_system)
            except VersionConflict:
                pass  # another replica starting at the same moment wrote it


__all__ = ["OPERATIONS", "publish_code_systems", "with_sterile_supply"]

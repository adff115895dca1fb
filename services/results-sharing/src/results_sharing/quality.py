"""Quality status of the producing centers (室间质评 EQA, 影像质控): one `VerificationResult` per
center × item (or item category) × period, with the scope it was awarded at.

Model (docs/results-sharing.md, "Quality evaluations"): a VerificationResult whose `target` is the
center's Organization, `status` `validated` while it stands, and the extension
`…/StructureDefinition/recognition-quality-evaluation` with `scope` (national, provincial, city,
alliance), `period` (start and end, both required) and one or more `item` (a catalog Coding) or
`category` (every item of lab, imaging, ecg, ultrasound, nuclear). VerificationResult rather than
an Organization extension: each evaluation is a record of its own with its evidence
(`validationProcess`, `primarySource`: the QC organization), created and revised through the API by
the QC office without rewriting the directory's Organization, which another service owns.

Records are projected into `recognition_quality` when written. Only `validated` records count;
setting another status (e.g. `val-fail`) withdraws the record.
"""

from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, delete, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from fhirkit.errors import BusinessRuleViolation
from fhirkit.search.values import date_range
from fhirkit.store import driver
from fhirkit.store.hooks import WriteContext
from fhirkit.store.read_mostly import ReadMostly
from results_sharing import catalog, db
from results_sharing.catalog import CatalogItem
from results_sharing.vocabulary import CATEGORIES, QUALITY_EVALUATION, RECOGNITION_ITEM, SCOPE_RANK, SCOPES


@dataclass(frozen=True)
class QualityRecord:
    record_id: str
    organization_id: str
    item_code: str | None
    category: str | None
    scope: str
    valid_from: int
    valid_to: int


@dataclass(frozen=True)
class Standing:
    """What the quality records say about one center and item at one moment."""

    state: str  # in-force | lapsed | none
    record: QualityRecord | None = None

    @property
    def scope(self) -> str | None:
        return self.record.scope if self.record else None


def evaluation(resource: dict[str, Any] | None) -> dict[str, Any] | None:
    for extension in (resource or {}).get("extension") or []:
        if isinstance(extension, dict) and extension.get("url") == QUALITY_EVALUATION:
            return extension
    return None


class QualityHooks:
    async def before_write(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        if resource is not None and evaluation(resource) is not None:
            records = _records(resource, context.resource_id)
            wanted = {r.item_code for r in records if r.item_code}
            known = await catalog.find_items(repo.conn, wanted)
            unknown = sorted(wanted - set(known))
            if unknown:
                raise BusinessRuleViolation(
                    f"Unknown recognition item(s) {', '.join(unknown)}: not in the catalog in force",
                    expression=["VerificationResult.extension"])

    async def after_write(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        QUALITY.changed(repo.conn)
        await repo.conn.execute(delete(db.quality).where(db.quality.c.record_id == context.resource_id))
        if resource is None or evaluation(resource) is None or resource.get("status") != "validated":
            return
        records = _records(resource, context.resource_id)
        await repo.conn.execute(insert(db.quality), [r.__dict__ for r in records])


def _records(resource: dict[str, Any], record_id: str) -> list[QualityRecord]:
    def problem(message: str, where: str = "VerificationResult.extension") -> BusinessRuleViolation:
        return BusinessRuleViolation(f"A quality evaluation {message}", expression=[where])

    targets = [t.get("reference", "") for t in resource.get("target") or [] if isinstance(t, dict)]
    if len(targets) != 1 or not targets[0].startswith("Organization/"):
        raise problem("has exactly one target: the evaluated center's Organization", "VerificationResult.target")
    parts: dict[str, list[Any]] = {}
    for part in (evaluation(resource) or {}).get("extension") or []:
        value = next((v for k, v in part.items() if k.startswith("value")), None)
        parts.setdefault(part.get("url", ""), []).append(value)
    scope = (parts.get("scope") or [None])[0]
    if scope not in SCOPES:
        raise problem(f"needs a scope: one of {', '.join(SCOPES)}")
    period = (parts.get("period") or [None])[0] or {}
    start = date_range(period.get("start", "")) if isinstance(period, dict) else None
    end = date_range(period.get("end", "")) if isinstance(period, dict) else None
    if start is None or end is None or start[0] > end[1]:
        raise problem("needs a period with a start and an end, the start first")
    items = [c.get("code") for c in parts.get("item") or []
             if isinstance(c, dict) and c.get("system") == RECOGNITION_ITEM]
    categories = parts.get("category") or []
    if len(items) != len(parts.get("item") or []) or not all(isinstance(i, str) for i in items):
        raise problem(f"names its items as Codings of {RECOGNITION_ITEM}")
    if any(c not in CATEGORIES for c in categories):
        raise problem(f"category must be one of {', '.join(CATEGORIES)}")
    if not items and not categories:
        raise problem("covers at least one item or category")
    organization_id = targets[0].split("/", 1)[1]
    common = {"record_id": record_id, "organization_id": organization_id, "scope": scope,
              "valid_from": start[0], "valid_to": end[1]}
    return ([QualityRecord(item_code=i, category=None, **common) for i in items]
            + [QualityRecord(item_code=None, category=c, **common) for c in categories])


# A center's records (a few dozen), by center: kept for the transaction and a few seconds beyond.
QUALITY = ReadMostly("quality-records")


async def records_of(conn: AsyncConnection, producer: str, item: CatalogItem) -> list[QualityRecord]:
    """One center's records for the item. A center's records are read once and kept
    (`QUALITY`): every result a center posts and every check of its results asks, item after
    item (the hook above drops them when records change)."""

    async def load() -> list[QualityRecord]:
        return [QualityRecord(*row) for row in await driver.execute(conn, _RECORDS_OF, {"organization_id": producer})]

    records = await QUALITY.get(conn, producer, load)
    return [r for r in records if r.item_code == item.code or r.category == item.category]


# Built once: every stored result of a center reads its records (once per transaction).
_RECORDS_OF = select(
    db.quality.c.record_id, db.quality.c.organization_id, db.quality.c.item_code, db.quality.c.category,
    db.quality.c.scope, db.quality.c.valid_from, db.quality.c.valid_to,
).where(db.quality.c.organization_id == bindparam("organization_id"))


def standing_at(records: list[QualityRecord], moment: int) -> Standing:
    """In force at `moment` (the widest scope wins), lapsed (there was one, it had ended), or none."""
    in_force = [r for r in records if r.valid_from <= moment <= r.valid_to]
    if in_force:
        return Standing("in-force", max(in_force, key=lambda r: (SCOPE_RANK[r.scope], r.valid_to)))
    if any(r.valid_to < moment for r in records):
        return Standing("lapsed")
    return Standing("none")

"""The recognition catalog (互认项目目录): a versioned `CodeSystem` and the items in force.

The catalog is the CodeSystem `…/CodeSystem/recognition-item`, one concept per item with the
properties `category`, `loinc`, `validity-days` (and optionally `validity-days-emergency`,
`validity-days-inpatient`), `scope-required` and `price`. Each version is its own resource
(`CodeSystem/recognition-item-<version>`), so past versions stay readable; the active version
written last is the one in force, projected into `recognition_catalog_item` for the indexed
look-ups of ingest and `$recognition-check`. Decisions copy what they used (item, version,
price), so a new version never rewrites past decisions or statistics.
"""

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlalchemy import bindparam, delete, insert, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from fhirkit.errors import BusinessRuleViolation
from fhirkit.store import driver
from fhirkit.store.hooks import WriteContext
from fhirkit.store.read_mostly import ReadMostly
from results_sharing import db
from results_sharing.vocabulary import CATEGORIES, LOINC, RECOGNITION_ITEM, SCOPES, loinc_check_digit_valid

PROPERTIES: dict[str, tuple[str, str]] = {
    # code: (type, description)
    "category": ("code", "lab, imaging, ecg, ultrasound or nuclear"),
    "loinc": ("code", "The LOINC code the item maps to"),
    "validity-days": ("integer", "How many days a result stays recognizable (互认时限)"),
    "validity-days-emergency": ("integer", "The validity for an emergency encounter, when it differs"),
    "validity-days-inpatient": ("integer", "The validity for an inpatient encounter, when it differs"),
    "scope-required": ("code", "The narrowest quality-evaluation scope the item accepts"),
    "price": ("decimal", "The price in CNY, for the money saved by recognition"),
}
REQUIRED = ("category", "validity-days", "scope-required", "price")


@dataclass(frozen=True)
class CatalogItem:
    code: str
    version: str
    display: str
    category: str
    loinc: str | None
    validity_days: int
    validity_days_emergency: int | None
    validity_days_inpatient: int | None
    scope_required: str
    price: Decimal

    def validity_for(self, encounter_class: str | None) -> int:
        chosen = {"EMER": self.validity_days_emergency, "IMP": self.validity_days_inpatient}.get(encounter_class or "")
        return chosen or self.validity_days

    def coding(self) -> dict[str, Any]:
        return {"system": RECOGNITION_ITEM, "version": self.version, "code": self.code, "display": self.display}


def is_catalog(code_system: dict[str, Any] | None) -> bool:
    return bool(code_system) and code_system.get("url") == RECOGNITION_ITEM  # type: ignore[union-attr]


class CatalogHooks:
    async def before_write(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        if is_catalog(resource):
            items(resource or {})  # raises on the first problem, naming the concept

    async def after_write(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        if is_catalog(resource) and (resource or {}).get("status") == "active":
            await _replace_items(repo.conn, context.resource_id, items(resource or {}))
        elif is_catalog(context.previous):
            # The catalog in force was retired or deleted: no item is recognizable until another is loaded.
            CATALOG.changed(repo.conn)
            await repo.conn.execute(delete(db.catalog_item).where(db.catalog_item.c.code_system_id == context.resource_id))


def items(code_system: dict[str, Any]) -> list[CatalogItem]:
    version = code_system.get("version")
    if not isinstance(version, str) or not version:
        raise BusinessRuleViolation("The recognition catalog needs a version", expression=["CodeSystem.version"])
    concepts = code_system.get("concept") or []
    if not concepts:
        raise BusinessRuleViolation("The recognition catalog lists no item", expression=["CodeSystem.concept"])
    found: list[CatalogItem] = []
    seen_codes: set[str] = set()
    seen_loinc: dict[str, str] = {}
    for index, concept in enumerate(concepts):
        item = _item(concept, version, f"CodeSystem.concept[{index}]")
        if item.code in seen_codes:
            raise BusinessRuleViolation(f"Item {item.code} is listed twice", expression=[f"CodeSystem.concept[{index}]"])
        if item.loinc and item.loinc in seen_loinc:
            raise BusinessRuleViolation(
                f"Items {seen_loinc[item.loinc]} and {item.code} map to the same LOINC {item.loinc}; "
                "a LOINC code must name one item", expression=[f"CodeSystem.concept[{index}]"])
        seen_codes.add(item.code)
        if item.loinc:
            seen_loinc[item.loinc] = item.code
        found.append(item)
    return found


def _item(concept: dict[str, Any], version: str, path: str) -> CatalogItem:
    values: dict[str, Any] = {}
    for prop in concept.get("property") or []:
        code = prop.get("code")
        value = next((v for k, v in prop.items() if k.startswith("value")), None)
        if code in PROPERTIES:
            values[code] = value
    missing = [name for name in REQUIRED if values.get(name) is None]
    if missing or not concept.get("display"):
        what = ", ".join(missing + ([] if concept.get("display") else ["display"]))
        raise BusinessRuleViolation(f"Catalog item {concept.get('code')} lacks {what}", expression=[path])

    def problem(message: str) -> BusinessRuleViolation:
        return BusinessRuleViolation(f"Catalog item {concept.get('code')}: {message}", expression=[path])

    if values["category"] not in CATEGORIES:
        raise problem(f"category must be one of {', '.join(CATEGORIES)}")
    if values["scope-required"] not in SCOPES:
        raise problem(f"scope-required must be one of {', '.join(SCOPES)}")
    loinc = values.get("loinc")
    if loinc is not None and not (isinstance(loinc, str) and loinc_check_digit_valid(loinc)):
        raise problem(f"'{loinc}' is not a LOINC code (wrong form or check digit)")
    days = [values.get(name) for name in ("validity-days", "validity-days-emergency", "validity-days-inpatient")]
    if any(d is not None and (not isinstance(d, int) or isinstance(d, bool) or d <= 0) for d in days):
        raise problem("validity days must be positive integers")
    try:
        price = Decimal(str(values["price"]))
    except InvalidOperation:
        raise problem("price must be a decimal") from None
    if price < 0:
        raise problem("price cannot be negative")
    return CatalogItem(str(concept["code"]), version, str(concept["display"]), values["category"], loinc,
                       days[0], days[1], days[2], values["scope-required"], price)


async def _replace_items(conn: AsyncConnection, code_system_id: str, found: list[CatalogItem]) -> None:
    CATALOG.changed(conn)
    await conn.execute(delete(db.catalog_item))
    await conn.execute(insert(db.catalog_item), [
        {"code": i.code, "version": i.version, "code_system_id": code_system_id, "display": i.display,
         "category": i.category, "loinc": i.loinc, "validity_days": i.validity_days,
         "validity_days_emergency": i.validity_days_emergency, "validity_days_inpatient": i.validity_days_inpatient,
         "scope_required": i.scope_required, "price": i.price}
        for i in found
    ])


async def find_item(conn: AsyncConnection, system: str | None, code: str) -> CatalogItem | None:
    """The item in force for a catalog code or a LOINC code (one indexed look-up, kept for the
    transaction and a few seconds beyond it: `CATALOG`)."""
    stmt = _ITEM_BY.get(system or "")
    if stmt is None:
        return None

    async def load() -> CatalogItem | None:
        rows = await driver.execute(conn, stmt, {"code": code})
        return _from_row(rows[0]) if rows else None

    return await CATALOG.get(conn, (system, code), load)


async def prefetch_items(conn: AsyncConnection, wanted: set[tuple[str, str]]) -> None:
    """Look up the items of many (system, code) pairs at once, for `find_item` to answer from its
    memo: a transaction's run of new results names a handful of codes, a query each."""
    missing = CATALOG.missing(conn, {(system, code) for system, code in wanted if system in _ITEM_BY})
    if not missing:
        return
    item = db.catalog_item.c
    rows = await conn.execute(_ITEMS.where(or_(
        item.code.in_(sorted(code for system, code in missing if system == RECOGNITION_ITEM)),
        item.loinc.in_(sorted(code for system, code in missing if system == LOINC)))).order_by(item.code))
    found: dict[tuple[str, str], CatalogItem] = {}
    for one in (_from_row(tuple(row)) for row in rows):  # by code, as find_item takes the first
        found.setdefault((RECOGNITION_ITEM, one.code), one)
        if one.loinc:
            found.setdefault((LOINC, one.loinc), one)
    for key in missing:
        CATALOG.remember(conn, key, found.get(key))


# Built once: every stored result looks its item up.
_ITEM_COLUMNS = ("code", "version", "display", "category", "loinc", "validity_days", "validity_days_emergency",
                 "validity_days_inpatient", "scope_required", "price")
_ITEMS = select(*(db.catalog_item.c[name] for name in _ITEM_COLUMNS))
_ITEM_BY = {
    RECOGNITION_ITEM: _ITEMS.where(db.catalog_item.c.code == bindparam("code")).limit(1),
    LOINC: _ITEMS.where(db.catalog_item.c.loinc == bindparam("code")).order_by(db.catalog_item.c.code).limit(1),
}
# Items by (system, code), None for a code in no item: every stored result and every check asks.
CATALOG = ReadMostly("recognition-catalog")


async def find_items(conn: AsyncConnection, codes: set[str]) -> dict[str, CatalogItem]:
    if not codes:
        return {}
    rows = await conn.execute(_ITEMS.where(db.catalog_item.c.code.in_(sorted(codes))))
    return {item.code: item for item in (_from_row(tuple(row)) for row in rows)}


def _from_row(row: tuple[Any, ...]) -> CatalogItem:
    """A catalog row in `_ITEM_COLUMNS` order."""
    values = dict(zip(_ITEM_COLUMNS, row, strict=True))
    # str() first: a driver may hand NUMERIC back as a float (SQLite), which Decimal would keep inexact.
    return CatalogItem(**{**values, "price": Decimal(str(values["price"]))})

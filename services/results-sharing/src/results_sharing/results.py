"""Ingest of shared results (Observation, DiagnosticReport): checks, the HR mark, the result index.

* A result posted by a shared center (the caller's organization is a lab, imaging, ECG or
  pathology center) is checked strictly, before anything is written: its subject is a Patient,
  its producer (`performer`) is the posting center, its code carries a LOINC code (valid check
  digit) or a catalog item code, it has an identifier (the producer's report number, so that a
  re-send updates it) and an effective time. Patient and producer must exist: the engine checks
  every reference through the directory. Anything wrong refuses the whole request (a transaction
  rolls back) with an OperationOutcome naming the element.
* From any caller, a catalog item code that is not in the catalog in force is refused.
* The HR mark (`…/StructureDefinition/recognition-mark`) is server-owned: it is recomputed on
  every write from the quality evaluation in force at the result's effective time, for the
  catalog item the result's code maps to. A mark sent by a client is replaced.
* Each result with a Patient subject, an Organization producer and a LOINC or catalog code is
  indexed in `recognition_result` (one row per code), whoever posted it; `$recognition-check`
  reads only that index. Cancelled and entered-in-error results leave it.
* A critical value (interpretation AA, HH or LL) stays "unacknowledged" until the Observation
  carries the extension `…/StructureDefinition/critical-value-acknowledgement` with
  `acknowledgedAt` (and `acknowledgedBy`): the producer records the closure of the 危急值 loop with
  `$acknowledge-critical` (results_sharing.critical) or by re-sending the result with it. A re-send
  without it keeps the recorded acknowledgement while the finding (value, interpretation) is the
  same: a LIS that does not know of it must not reopen the loop, but a changed critical value must
  be called in again. A DiagnosticReport is critical while any of its results is.
"""

from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, bindparam, delete, false, select, text, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from fhirkit.errors import BusinessRuleViolation
from fhirkit.search.values import date_range, format_instant
from fhirkit.store import driver
from fhirkit.store.hooks import WriteContext
from fhirkit.store.tables import reference_index, resource, token_index
from results_sharing import catalog, db, quality
from results_sharing.catalog import CatalogItem
from results_sharing.vocabulary import (
    CRITICAL_ACKNOWLEDGEMENT,
    CRITICAL_INTERPRETATIONS,
    DIAGNOSTIC_CONCLUSION_CATEGORIES,
    FACILITY_LEVEL,
    LOINC,
    MARK_LABELS,
    RECOGNITION_ITEM,
    RECOGNITION_MARK,
    RESULT_CENTERS,
    V2_0074,
    WITHDRAWN_STATUSES,
    code_in,
    codings,
    loinc_check_digit_valid,
    reference_of,
)

DAY_MICROS = 86_400_000_000


@dataclass(frozen=True)
class SharedResult:
    """What recognition needs to know about one stored result."""

    resource_type: str
    patient_id: str | None
    producer_id: str | None
    codes: tuple[tuple[str, str], ...]  # (system, code): LOINC and catalog codes
    effective: int | None
    status: str
    critical: bool  # a critical value not yet acknowledged
    diagnostic_conclusion: bool

    @property
    def indexable(self) -> bool:
        return bool(self.patient_id and self.producer_id and self.codes and self.effective is not None
                    and self.status not in WITHDRAWN_STATUSES)


def shared_result(body: dict[str, Any]) -> SharedResult:
    subject = reference_of(body.get("subject")) or ""
    producer = next((r for r in map(reference_of, body.get("performer") or []) if r and r.startswith("Organization/")),
                    None)
    codes = tuple((c["system"], c["code"]) for c in codings(body.get("code"))
                  if c.get("system") in (LOINC, RECOGNITION_ITEM) and isinstance(c.get("code"), str))
    return SharedResult(
        resource_type=body["resourceType"],
        patient_id=subject.split("/", 1)[1] if subject.startswith("Patient/") else None,
        producer_id=producer.split("/", 1)[1] if producer else None,
        codes=codes,
        effective=effective_time(body),
        status=str(body.get("status", "")),
        critical=_critical_open(body),
        diagnostic_conclusion=body["resourceType"] == "DiagnosticReport" and any(
            c.get("system") == V2_0074 and c.get("code") in DIAGNOSTIC_CONCLUSION_CATEGORIES
            for concept in body.get("category") or [] for c in codings(concept)),
    )


# A write's SharedResult, worked out once for its hooks (before_creates, before_write, the
# after-hooks): 14 µs each time, 3 % of a transaction's worker CPU when it was worked out three
# times. Kept for the transaction by the body dict itself (held, so that its id is not reused),
# and let go by the after-hook: a later write of the same dict, changed, works it out afresh.
# Between the first hook and the last only the recognition mark changes in the body, which a
# SharedResult does not read; an update's acknowledgement is kept (before_write) before its
# SharedResult is first worked out.
_SHARED_RESULTS = "results_sharing.shared_results"


def _shared_result_of(conn: AsyncConnection, body: dict[str, Any], *, last: bool = False) -> SharedResult:
    """`last`: the write's last hook asks (the memo lets it go)."""
    memo = driver.transaction_memo(conn, _SHARED_RESULTS)
    kept = memo.pop(id(body), None) if last else memo.get(id(body))
    if kept is not None and kept[0] is body:
        return kept[1]
    result = shared_result(body)
    if not last:
        memo[id(body)] = (body, result)
    return result


def effective_time(body: dict[str, Any]) -> int | None:
    moment = (body.get("effectiveDateTime") or body.get("effectiveInstant")
              or (body.get("effectivePeriod") or {}).get("start") or body.get("issued"))
    bounds = date_range(moment) if isinstance(moment, str) else None
    return bounds[0] if bounds else None


def _critical_open(body: dict[str, Any]) -> bool:
    return body["resourceType"] == "Observation" and critical_interpretation(body) and not acknowledged(body)


def critical_interpretation(body: dict[str, Any]) -> bool:
    return any(c.get("code") in CRITICAL_INTERPRETATIONS
               for concept in body.get("interpretation") or [] for c in codings(concept))


def _acknowledgement(body: dict[str, Any]) -> dict[str, Any] | None:
    for extension in body.get("extension") or []:
        if isinstance(extension, dict) and extension.get("url") == CRITICAL_ACKNOWLEDGEMENT:
            return extension
    return None


def acknowledged(body: dict[str, Any]) -> bool:
    extension = _acknowledgement(body) or {}
    return any(part.get("url") == "acknowledgedAt" and part.get("valueDateTime")
               for part in extension.get("extension") or [])


# What a critical value is: the same finding keeps its acknowledgement across re-sends.
_FINDING = ("value", "interpretation", "component")


def _keep_acknowledgement(body: dict[str, Any], previous: dict[str, Any] | None) -> None:
    """A re-send without the acknowledgement keeps the one recorded, for the same finding."""
    if body["resourceType"] != "Observation" or previous is None or _acknowledgement(body) is not None:
        return
    recorded = _acknowledgement(previous)
    if recorded is not None and _finding(body) == _finding(previous):
        body["extension"] = [*(body.get("extension") or []), recorded]


def _finding(body: dict[str, Any]) -> dict[str, Any]:
    return {key: item for key, item in body.items() if key.startswith(_FINDING)}


_FORGET_RESULT = delete(db.result).where(
    db.result.c.resource_type == bindparam("b_type"), db.result.c.resource_id == bindparam("b_id"))
# Another live resource of the type with the same identifier (a create that should have been a re-send).
_SAME_IDENTIFIER = (select(resource.c.resource_id)
                    .join(token_index, token_index.c.rid == resource.c.rid)
                    .where(token_index.c.resource_type == bindparam("b_type"), token_index.c.param == "identifier",
                           token_index.c.code == bindparam("b_code"), token_index.c.system == bindparam("b_system"),
                           resource.c.deleted == false(), resource.c.resource_id != bindparam("b_id"))
                    .limit(1))


class ResultHooks:
    async def before_write(self, repo: Any, body: dict[str, Any] | None, context: WriteContext) -> None:
        if body is None:
            return
        _keep_acknowledgement(body, context.previous)
        result = _shared_result_of(repo.conn, body)
        if await _posted_by_result_center(repo):
            require_shared_result(body, result, repo.caller.organization)
            if context.previous is None:
                await _refuse_duplicate(repo, body, context.resource_id)
        item = await _catalog_item(repo.conn, body, result)
        _stamp_mark(body, result, item, await _quality_standing(repo.conn, result, item))

    async def after_write(self, repo: Any, body: dict[str, Any] | None, context: WriteContext) -> None:
        if context.previous is not None:  # a first version has no rows yet (a delete forgot its own)
            await driver.execute(repo.conn, _FORGET_RESULT,
                                 {"b_type": context.resource_type, "b_id": context.resource_id})
        await _record_results(repo.conn, [(body, context)])

    # A transaction's run of new results (fhirkit.store.hooks.BatchHooks): their identifiers and
    # catalog items are looked up in one statement each, and their rows written in one.

    def creates_together(self, resource: dict[str, Any]) -> bool:
        return True

    async def before_creates(self, repo: Any, resources: list[dict[str, Any]]) -> None:
        if await _posted_by_result_center(repo):
            repo.batch_memo[_HOLDERS] = await _identifier_holders(repo.conn, resources)
        results = [_shared_result_of(repo.conn, body) for body in resources]
        await catalog.prefetch_items(repo.conn, {pair for result in results for pair in result.codes})

    async def after_creates(self, repo: Any, resources: list[dict[str, Any]], contexts: list[WriteContext]) -> None:
        await _record_results(repo.conn, list(zip(resources, contexts)))


async def _record_results(conn: AsyncConnection, written: list[tuple[dict[str, Any] | None, WriteContext]]) -> None:
    """The result rows of written versions, in one statement, then the reports they touch."""
    rows: list[dict[str, Any]] = []
    touched: list[str] = []
    for body, context in written:
        result = _shared_result_of(conn, body, last=True) if body is not None else None
        critical = False
        if body is not None and result is not None and result.indexable:
            critical = result.critical or await _any_result_critical(conn, body)
            mark = _mark_label(body)
            rows += [{"patient_id": result.patient_id, "system": system, "code": code, "effective": result.effective,
                      "resource_type": context.resource_type, "resource_id": context.resource_id,
                      "producer_id": result.producer_id, "status": result.status, "critical_open": critical,
                      "diagnostic_conclusion": result.diagnostic_conclusion, "mark_label": mark}
                     for system, code in result.codes]
        # A report written earlier (in the same bundle) naming a new, non-critical result was
        # judged right without it: only a change, or a new critical value, moves its flag.
        if context.resource_type == "Observation" and (context.previous is not None or critical):
            touched.append(context.resource_id)
    await driver.insert_rows(conn, db.result, rows)
    for resource_id in touched:
        await _refresh_reports_of(conn, resource_id)


async def _posted_by_result_center(repo: Any) -> bool:
    organization = getattr(repo.caller, "organization", None)
    if not isinstance(organization, str) or not organization.startswith("Organization/"):
        return False
    found = await repo.config.references.read("Organization", organization.split("/", 1)[1])
    return code_in((found or {}).get("type"), FACILITY_LEVEL) in RESULT_CENTERS


def require_shared_result(body: dict[str, Any], result: SharedResult, caller_organization: str) -> None:
    kind = body["resourceType"]

    def refuse(message: str, element: str) -> BusinessRuleViolation:
        return BusinessRuleViolation(f"A shared {kind} {message}", expression=[f"{kind}.{element}"])

    if result.patient_id is None:
        raise refuse("has a Patient as its subject", "subject")
    if result.producer_id is None:
        raise refuse("names its producing center (an Organization) in performer", "performer")
    if f"Organization/{result.producer_id}" != caller_organization:
        raise refuse(f"is posted by its producer: performer Organization/{result.producer_id} is not the caller "
                     f"{caller_organization}", "performer")
    bad_loinc = [code for system, code in result.codes if system == LOINC and not loinc_check_digit_valid(code)]
    if bad_loinc:
        raise refuse(f"has an unknown LOINC code '{bad_loinc[0][:40]}' (wrong form or check digit)", "code")
    if not result.codes:
        raise refuse(f"has an unknown code: code carries no LOINC ({LOINC}) or catalog item ({RECOGNITION_ITEM}) "
                     "coding", "code")
    if not [i for i in body.get("identifier") or [] if isinstance(i, dict) and i.get("system") and i.get("value")]:
        raise refuse("carries the producer's identifier (system and value), so that a re-send updates it",
                     "identifier")
    if result.effective is None:
        raise refuse("has an effective time (effective[x] or issued)", "effective[x]")


async def _refuse_duplicate(repo: Any, body: dict[str, Any], resource_id: str) -> None:
    """A second create of a report the store already has would duplicate it; say how to re-send."""
    kind = body["resourceType"]
    holders = repo.batch_memo.get(_HOLDERS) if repo.batch_memo is not None else None
    for system, value in _identifiers(body):
        if holders is None:
            found = await driver.execute(repo.conn, _SAME_IDENTIFIER, {
                "b_type": kind, "b_code": value, "b_system": system, "b_id": resource_id})
            existing = found[0][0] if found else None
        else:  # in a run of creates: what the store held before it, and the run's earlier bodies
            existing = holders.setdefault((kind, system, value), resource_id)
            existing = None if existing == resource_id else existing
        if existing is not None:
            criteria = f"{kind}?identifier={system}|{value}"
            raise BusinessRuleViolation(
                f"{kind}/{existing} already has identifier {system}|{value}; "
                f"re-send it as a conditional update (PUT {criteria}) to update it",
                expression=[f"{kind}.identifier"])


def _identifiers(body: dict[str, Any]) -> list[tuple[str, str]]:
    """(system, value) of the body's identifiers, as the token index keeps them."""
    return [(str(i["system"])[:255], str(i["value"])[:255]) for i in body.get("identifier") or []
            if isinstance(i, dict) and i.get("system") and i.get("value")]


_HOLDERS = "result-identifier-holders"


async def _identifier_holders(conn: AsyncConnection, bodies: list[dict[str, Any]]) -> dict[tuple[str, str, str], str]:
    """(type, system, value) → the live resource holding that identifier, for the bodies' identifiers."""
    holders: dict[tuple[str, str, str], str] = {}
    by_type: dict[str, set[tuple[str, str]]] = {}
    for body in bodies:
        by_type.setdefault(body["resourceType"], set()).update(_identifiers(body))
    for kind, pairs in by_type.items():
        ordered = sorted(pairs)
        if conn.dialect.name == "postgresql":
            rows = await conn.execute(_HOLDERS_BY_PAIR, {"b_type": kind, "b_systems": [p[0] for p in ordered],
                                                         "b_values": [p[1] for p in ordered]})
        else:
            rows = await conn.execute(_holders_in(kind, ordered))
        for system, value, resource_id in rows:
            holders.setdefault((kind, system, value), resource_id)
    return holders


# PostgreSQL: one index look-up per (system, value), as `_SAME_IDENTIFIER` does for one. Asked as
# an IN list, a store never analysed (a first bulk load) is planned as a scan of every identifier
# of the type: 150 ms for 100 identifiers among 100,000, against 0.35 ms this way.
_HOLDERS_BY_PAIR = text(f"""
SELECT wanted.system, wanted.value, found.resource_id
FROM unnest(CAST(:b_systems AS VARCHAR[]), CAST(:b_values AS VARCHAR[])) AS wanted(system, value)
CROSS JOIN LATERAL (
    SELECT r.resource_id FROM {token_index.name} AS t JOIN {resource.name} AS r ON r.rid = t.rid
    WHERE t.resource_type = :b_type AND t.param = 'identifier' AND t.code = wanted.value
      AND t.system = wanted.system AND r.deleted = false
    LIMIT 1) AS found
""")


def _holders_in(kind: str, pairs: list[tuple[str, str]]) -> Any:
    """SQLite: the pairs as a row-value IN list, which it looks up in the index."""
    return (select(token_index.c.system, token_index.c.code, resource.c.resource_id)
            .join(resource, token_index.c.rid == resource.c.rid)
            .where(token_index.c.resource_type == kind, token_index.c.param == "identifier",
                   tuple_(token_index.c.system, token_index.c.code).in_(pairs), resource.c.deleted == false()))


async def _catalog_item(conn: AsyncConnection, body: dict[str, Any], result: SharedResult) -> CatalogItem | None:
    item = None
    for system, code in result.codes:
        found = await catalog.find_item(conn, system, code)
        if system == RECOGNITION_ITEM and found is None:
            raise BusinessRuleViolation(
                f"Unknown recognition item code '{code[:64]}': not in the catalog in force",
                expression=[f"{body['resourceType']}.code"])
        item = item or found
    return item


async def _quality_standing(conn: AsyncConnection, result: SharedResult, item: CatalogItem | None) -> Any:
    if item is None or result.producer_id is None or result.effective is None:
        return None
    return quality.standing_at(await quality.records_of(conn, result.producer_id, item), result.effective)


def _stamp_mark(body: dict[str, Any], result: SharedResult, item: CatalogItem | None, standing: Any) -> None:
    kept = [e for e in body.get("extension") or [] if not (isinstance(e, dict) and e.get("url") == RECOGNITION_MARK)]
    if item is not None and standing is not None and standing.state == "in-force" and result.effective is not None:
        valid_until = result.effective + item.validity_days * DAY_MICROS
        kept.append({"url": RECOGNITION_MARK, "extension": [
            {"url": "label", "valueString": MARK_LABELS[standing.scope]},
            {"url": "scope", "valueCode": standing.scope},
            {"url": "item", "valueCoding": item.coding()},
            {"url": "basis", "valueReference": {"reference": f"VerificationResult/{standing.record.record_id}"}},
            {"url": "validUntil", "valueDateTime": format_instant(valid_until)},
        ]})
    if kept:
        body["extension"] = kept
    else:
        body.pop("extension", None)


def _mark_label(body: dict[str, Any]) -> str | None:
    for extension in body.get("extension") or []:
        if isinstance(extension, dict) and extension.get("url") == RECOGNITION_MARK:
            for part in extension.get("extension") or []:
                if part.get("url") == "label":
                    return part.get("valueString")
    return None


async def _any_result_critical(conn: AsyncConnection, body: dict[str, Any]) -> bool:
    if body.get("resourceType") != "DiagnosticReport":
        return False
    ids = [r.split("/", 1)[1] for r in map(reference_of, body.get("result") or []) if r and r.startswith("Observation/")]
    if not ids:
        return False
    stmt = select(db.result.c.id).where(
        db.result.c.resource_type == "Observation", db.result.c.resource_id.in_(ids), db.result.c.critical_open
    ).limit(1)
    return (await conn.execute(stmt)).first() is not None


# The reports listing an Observation among their results (built once: run on every result write).
_REPORTS_OF = (select(resource.c.resource_id)
               .join(reference_index, reference_index.c.rid == resource.c.rid)
               .where(reference_index.c.resource_type == "DiagnosticReport", reference_index.c.param == "result",
                      reference_index.c.target_type == "Observation",
                      reference_index.c.target_id == bindparam("observation_id"),
                      resource.c.deleted == false()))


async def _refresh_reports_of(conn: AsyncConnection, observation_id: str) -> None:
    """A report is critical while one of its results is: follow an Observation's change up."""
    for (report_id,) in await driver.execute(conn, _REPORTS_OF, {"observation_id": observation_id}):
        members = (select(reference_index.c.target_id)
                   .join(resource, resource.c.rid == reference_index.c.rid)
                   .where(resource.c.resource_type == "DiagnosticReport", resource.c.resource_id == report_id,
                          reference_index.c.param == "result", reference_index.c.target_type == "Observation"))
        open_member = select(db.result.c.id).where(
            and_(db.result.c.resource_type == "Observation", db.result.c.resource_id.in_(members),
                 db.result.c.critical_open)).limit(1)
        critical = (await conn.execute(open_member)).first() is not None
        await conn.execute(update(db.result).where(
            db.result.c.resource_type == "DiagnosticReport", db.result.c.resource_id == report_id
        ).values(critical_open=critical))

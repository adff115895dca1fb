"""Decision records (`Task` recognition-decision) and `$recognition-statistics` (DOMAIN.md §3).

A decision is a Task with `code` `…/CodeSystem/task-code#recognition-decision`, `status`
`completed` (or `cancelled` / `entered-in-error` to withdraw it), `for` the Patient,
`businessStatus` `…/CodeSystem/recognition-decision-status#recognized|not-recognized`,
`statusReason` from `…/CodeSystem/non-recognition-reason` (required when not recognized, refused
when recognized), and `input`s typed by `…/CodeSystem/recognition-decision-input`: `item` (the
ordered item, a catalog code or LOINC) and `result` (the prior result; required when recognized).

On create the server resolves the item in the catalog in force and records, as further inputs,
what the statistics count: the item with its catalog version, its `category`, its `price` and
the result's `producer`. Those inputs never change afterwards, so a new catalog version does not
rewrite past decisions. `requester` defaults to the caller's organization, `authoredOn` to now.
"""

from collections import defaultdict
from decimal import Decimal
from typing import Any

from sqlalchemy import delete, insert, or_, select

from fhirkit import jsonio
from fhirkit.api.interactions import Result
from fhirkit.api.router import OperationCall
from fhirkit.errors import BusinessRuleViolation, InvalidRequest
from fhirkit.search.values import date_range, format_instant
from fhirkit.store.hooks import WriteContext
from fhirkit.workflow.statistics import organization_scope
from results_sharing import catalog, db
from results_sharing.vocabulary import (
    DECISION_INPUT,
    DECISION_STATUS,
    DECISION_STATUSES,
    LOINC,
    NON_RECOGNITION_REASON,
    NON_RECOGNITION_REASONS,
    RECOGNITION_ITEM,
    TASK_CODE,
    code_in,
    reference_of,
)

DECISION_CODE = "recognition-decision"
STAMPED_INPUTS = ("item", "category", "price", "producer")
RECORD_STATUSES = ("completed", "cancelled", "entered-in-error")


def is_decision(task: dict[str, Any] | None) -> bool:
    return code_in((task or {}).get("code"), TASK_CODE) == DECISION_CODE


def _input(task: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for entry in task.get("input") or []:
        if isinstance(entry, dict) and code_in(entry.get("type"), DECISION_INPUT) == kind:
            return entry
    return None


def _typed(kind: str, **value: Any) -> dict[str, Any]:
    return {"type": {"coding": [{"system": DECISION_INPUT, "code": kind}]}, **value}


class DecisionHooks:
    async def before_write(self, repo: Any, task: dict[str, Any] | None, context: WriteContext) -> None:
        if task is None or not is_decision(task):
            return
        _check_content(task)
        if context.previous is not None and is_decision(context.previous):
            _keep_recorded_inputs(task, context.previous)
        else:
            await _record_inputs(repo, task)
        caller_organization = getattr(repo.caller, "organization", None)
        if not task.get("requester") and caller_organization:
            task["requester"] = {"reference": caller_organization}
        if not (reference_of(task.get("requester")) or "").startswith("Organization/"):
            raise BusinessRuleViolation("A decision's requester is the ordering Organization",
                                        expression=["Task.requester"])
        task.setdefault("authoredOn", format_instant(repo.config.clock()))

    async def after_write(self, repo: Any, task: dict[str, Any] | None, context: WriteContext) -> None:
        table = db.decision
        await repo.conn.execute(delete(table).where(table.c.task_id == context.resource_id))
        if task is None or not is_decision(task) or task.get("status") != "completed":
            return
        await repo.conn.execute(insert(table).values(**decision_row(task, context.resource_id)))


def _check_content(task: dict[str, Any]) -> None:
    def refuse(message: str, element: str) -> BusinessRuleViolation:
        return BusinessRuleViolation(f"A recognition decision {message}", expression=[f"Task.{element}"])

    if task.get("status") not in RECORD_STATUSES:
        raise refuse(f"is a record: its status is {', '.join(RECORD_STATUSES)}", "status")
    if not (reference_of(task.get("for")) or "").startswith("Patient/"):
        raise refuse("is for a Patient", "for")
    decision = code_in(task.get("businessStatus"), DECISION_STATUS)
    if decision not in DECISION_STATUSES:
        raise refuse(f"has businessStatus {DECISION_STATUS}#recognized or #not-recognized", "businessStatus")
    reason = code_in(task.get("statusReason"), NON_RECOGNITION_REASON)
    if decision == "not-recognized" and reason not in NON_RECOGNITION_REASONS:
        raise refuse(f"not to recognize needs a statusReason from {NON_RECOGNITION_REASON} "
                     f"({', '.join(NON_RECOGNITION_REASONS)})", "statusReason")
    if decision == "recognized" and task.get("statusReason"):
        raise refuse("to recognize takes no statusReason", "statusReason")
    if decision == "recognized" and _input(task, "result") is None:
        raise refuse("to recognize names the recognized result (input 'result')", "input")


async def _record_inputs(repo: Any, task: dict[str, Any]) -> None:
    item_input = _input(task, "item")
    coding = (item_input or {}).get("valueCoding") or {}
    item = await catalog.find_item(repo.conn, coding.get("system"), str(coding.get("code", ""))) if coding else None
    if item is None:
        raise BusinessRuleViolation(
            f"A recognition decision names its item (input 'item', a Coding of {RECOGNITION_ITEM} or {LOINC}) "
            "in the catalog in force", expression=["Task.input"])
    producer = await _producer(repo, task)
    kept = [e for e in task.get("input") or [] if code_in(e.get("type"), DECISION_INPUT) not in STAMPED_INPUTS]
    task["input"] = [
        *kept,
        _typed("item", valueCoding=item.coding()),
        _typed("category", valueCode=item.category),
        _typed("price", valueMoney={"value": item.price, "currency": "CNY"}),
        *([_typed("producer", valueReference={"reference": producer})] if producer else []),
    ]


async def _producer(repo: Any, task: dict[str, Any]) -> str | None:
    """The producer of the decided-on result, from the result index (which also proves it is the
    patient's shared result)."""
    result = reference_of((_input(task, "result") or {}).get("valueReference"))
    if result is None:
        return None
    kind, _, result_id = result.partition("/")
    row = (await repo.conn.execute(select(db.result.c.patient_id, db.result.c.producer_id).where(
        db.result.c.resource_type == kind, db.result.c.resource_id == result_id).limit(1))).first()
    patient = (reference_of(task.get("for")) or "").split("/", 1)[-1]
    if row is None or row.patient_id != patient:
        raise BusinessRuleViolation(f"{result[:80]} is not a shared result of {reference_of(task.get('for'))}",
                                    expression=["Task.input"])
    return f"Organization/{row.producer_id}"


def _keep_recorded_inputs(task: dict[str, Any], previous: dict[str, Any]) -> None:
    for element in ("for", "requester", "authoredOn"):
        if task.get(element) is None and previous.get(element) is not None:
            task[element] = previous[element]
        if previous.get(element) is not None and task.get(element) != previous.get(element):
            raise BusinessRuleViolation(f"Task.{element} of a recognition decision cannot change",
                                        expression=[f"Task.{element}"])
    recorded = [e for e in previous.get("input") or [] if code_in(e.get("type"), DECISION_INPUT) in STAMPED_INPUTS]
    kept = [e for e in task.get("input") or [] if code_in(e.get("type"), DECISION_INPUT) not in STAMPED_INPUTS]
    task["input"] = [*kept, *recorded]


def decision_row(task: dict[str, Any], task_id: str) -> dict[str, Any]:
    decision = code_in(task.get("businessStatus"), DECISION_STATUS)
    reason = code_in(task.get("statusReason"), NON_RECOGNITION_REASON)
    item = (_input(task, "item") or {}).get("valueCoding") or {}
    price = ((_input(task, "price") or {}).get("valueMoney") or {}).get("value")
    authored = date_range(task.get("authoredOn", ""))
    return {
        "task_id": task_id,
        "authored": authored[0] if authored else 0,
        "decision": decision,
        "reason": reason,
        "counted": decision == "recognized" or NON_RECOGNITION_REASONS.get(reason or "", ("", True))[1],
        "item_code": item.get("code"),
        "catalog_version": item.get("version"),
        "category": (_input(task, "category") or {}).get("valueCode"),
        "producer": reference_of((_input(task, "producer") or {}).get("valueReference")),
        "requester": reference_of(task.get("requester")) or "",
        "price": Decimal(str(price)) if price is not None else None,
    }


# --- $recognition-statistics --------------------------------------------------------------------

async def recognition_statistics(call: OperationCall) -> Result:
    period = call.parameter("period")
    if not isinstance(period, str):
        raise InvalidRequest("$recognition-statistics needs period=YYYY, YYYY-MM, YYYY-MM-DD or start/end")
    low, high = _period(period)
    organization = organization_scope(call, "recognition")
    d = db.decision.c
    stmt = select(db.decision).where(d.authored >= low, d.authored <= high)
    if organization:
        stmt = stmt.where(or_(d.requester == organization, d.producer == organization))
    rows = [row._mapping for row in await call.repo.conn.execute(stmt)]
    parameters: list[dict[str, Any]] = [{"name": "period", "valueString": period}]
    if organization:
        parameters.append({"name": "organization", "valueReference": {"reference": organization}})
    parameters += _figures(rows)
    parameters.append({"name": "byReason", "part": [
        {"name": code, "valueInteger": sum(1 for r in rows if r["reason"] == code)}
        for code in NON_RECOGNITION_REASONS if any(r["reason"] == code for r in rows)]})
    for name, key in (("byProducer", "producer"), ("byCategory", "category"), ("byRequester", "requester")):
        groups: dict[str, list[Any]] = defaultdict(list)
        for row in rows:
            groups[row[key] or "unknown"].append(row)
        parameters += [{"name": name, "part": [{"name": "key", "valueString": group}, *_figures(members)]}
                       for group, members in sorted(groups.items())]
    return Result(200, jsonio.dumps({"resourceType": "Parameters", "parameter": parameters}))


def compute(rows: list[Any]) -> dict[str, Any]:
    """The arithmetic: 98 and 99 are decisions but count neither for nor against the rate."""
    recognized = [r for r in rows if r["decision"] == "recognized"]
    not_recognized = [r for r in rows if r["decision"] == "not-recognized" and r["counted"]]
    counted = len(recognized) + len(not_recognized)
    return {
        "decisions": len(rows),
        "recognized": len(recognized),
        "notRecognized": len(not_recognized),
        "notCounted": len(rows) - counted,
        "recognitionRate": (Decimal(len(recognized)) / counted).quantize(Decimal("0.0001")) if counted else None,
        "moneySaved": sum((Decimal(r["price"] or 0) for r in recognized), Decimal("0.00")),
    }


def _figures(rows: list[Any]) -> list[dict[str, Any]]:
    figures = compute(rows)
    out: list[dict[str, Any]] = [{"name": name, "valueInteger": figures[name]}
                                 for name in ("decisions", "recognized", "notRecognized", "notCounted")]
    rate = figures["recognitionRate"]
    out.append({"name": "recognitionRate", "valueDecimal": rate} if rate is not None
               else {"name": "recognitionRate", "valueString": "n/a"})
    out.append({"name": "moneySaved", "valueMoney": {"value": figures["moneySaved"], "currency": "CNY"}})
    return out


def _period(text: str) -> tuple[int, int]:
    start, _, end = text.partition("/")
    low = date_range(start)
    high = date_range(end) if end else low
    if low is None or high is None:
        raise InvalidRequest(f"period '{text[:40]}' is not a date or date range")
    return low[0], high[1]

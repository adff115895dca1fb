"""Questions answered by SQL over the engine's index tables (never by reading every resource).

The monitoring Observations (`code`, `device`, `focus`, `value-concept`, `status`), the cycles
(`performer`, `identifier`, `date`), the barcodes (`Device.identifier`) and the recall records
(`DetectedIssue.implicated`) are all standard search parameters, so their index rows answer
these joins directly.
"""

from typing import Any

from sqlalchemy import false, func, select

from fhirkit import jsonio
from fhirkit.store.tables import date_index, reference_index, resource, token_index
from results_sharing.sterile import codes

FINAL_STATUSES = ("final", "amended", "corrected")


def _token(param: str, system: str | None, code: str | None, resource_type: str) -> Any:
    """Index rows of a token parameter; `code` None matches any code of the system."""
    alias = token_index.alias()
    conditions = [alias.c.resource_type == resource_type, alias.c.param == param]
    if code is not None:
        conditions.append(alias.c.code == code)
    if system is not None:
        conditions.append(alias.c.system == system)
    return alias, conditions


def _reference(param: str, target_type: str, target_id: str | None, resource_type: str) -> Any:
    alias = reference_index.alias()
    conditions = [alias.c.resource_type == resource_type, alias.c.param == param, alias.c.target_type == target_type]
    if target_id is not None:
        conditions.append(alias.c.target_id == target_id)
    return alias, conditions


def _final(rid: Any) -> Any:
    status = token_index.alias()
    return select(status.c.rid).where(
        status.c.rid == rid, status.c.resource_type == "Observation", status.c.param == "status",
        status.c.code.in_(FINAL_STATUSES),
    ).exists()


def _results(kind: str, result: str) -> tuple[Any, list[Any]]:
    """Final monitoring Observations of one kind with one result, as an index join on their rid."""
    code, code_on = _token("code", codes.MONITORING, kind, "Observation")
    value, value_on = _token("value-concept", codes.RESULT, result, "Observation")
    return code, [*code_on, *value_on, value.c.rid == code.c.rid, _final(code.c.rid)]


async def last_passing_cycle_start(conn: Any, sterilizer_id: str, before: int) -> int | None:
    """Start of the latest cycle of the sterilizer, before `before`, whose biological indicator passed."""
    observation, conditions = _results(codes.BIOLOGICAL, codes.PASS)
    device, device_on = _reference("device", "Device", sterilizer_id, "Observation")
    focus, focus_on = _reference("focus", "Procedure", None, "Observation")
    cycle = resource.alias()
    start = date_index.alias()
    stmt = select(func.max(start.c.low)).where(
        *conditions, *device_on, *focus_on,
        device.c.rid == observation.c.rid, focus.c.rid == observation.c.rid,
        cycle.c.resource_type == "Procedure", cycle.c.resource_id == focus.c.target_id, cycle.c.deleted == false(),
        start.c.rid == cycle.c.rid, start.c.resource_type == "Procedure", start.c.param == "date",
        start.c.low < before,
    )
    return (await conn.execute(stmt)).scalar_one_or_none()


async def cycle_results(conn: Any, cycle_id: str) -> set[tuple[str, str]]:
    """(kind, result) of every final monitoring Observation on a cycle."""
    code, code_on = _token("code", codes.MONITORING, None, "Observation")
    value, value_on = _token("value-concept", codes.RESULT, None, "Observation")
    focus, focus_on = _reference("focus", "Procedure", cycle_id, "Observation")
    stmt = select(code.c.code, value.c.code).where(
        *code_on, *value_on, *focus_on, value.c.rid == code.c.rid, focus.c.rid == code.c.rid, _final(code.c.rid)
    )
    return {(row[0], row[1]) for row in await conn.execute(stmt)}


async def referencing(conn: Any, source_type: str, param: str, target: str) -> list[dict[str, Any]]:
    """Live resources of `source_type` whose `param` points at `target` (Type/id), oldest first."""
    target_type, target_id = target.split("/", 1)
    link, link_on = _reference(param, target_type, target_id, source_type)
    source = resource.alias()
    stmt = (
        select(source.c.content)
        .where(*link_on, source.c.rid == link.c.rid, source.c.deleted == false())
        .order_by(source.c.last_updated, source.c.rid)
    )
    return [jsonio.loads(row[0]) for row in await conn.execute(stmt)]


async def ids_with_identifier(conn: Any, resource_type: str, system: str | None, value: str) -> list[str]:
    identifier, conditions = _token("identifier", system, value, resource_type)
    source = resource.alias()
    stmt = select(source.c.resource_id).where(
        *conditions, source.c.rid == identifier.c.rid, source.c.deleted == false()
    ).distinct()
    return [row[0] for row in await conn.execute(stmt)]


async def cycles_with_load_number(conn: Any, sterilizer_id: str, load_number: str) -> list[str]:
    identifier, conditions = _token("identifier", codes.LOAD_NUMBER, load_number, "Procedure")
    performer, performer_on = _reference("performer", "Device", sterilizer_id, "Procedure")
    source = resource.alias()
    stmt = select(source.c.resource_id).where(
        *conditions, *performer_on, performer.c.rid == identifier.c.rid,
        source.c.rid == identifier.c.rid, source.c.deleted == false(),
    ).distinct()
    return [row[0] for row in await conn.execute(stmt)]

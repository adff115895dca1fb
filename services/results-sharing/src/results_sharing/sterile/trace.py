"""`GET /fhir/Device/$trace?identifier=<barcode>`: one pack's whole path, from load to patient.

Answers a `Parameters` with the pack, its release status, its load (cycle, load number,
sterilizer, sterilization time), the monitoring results of that cycle, every delivery, every use
(procedure, patient, institution, time) and any recall implicating it. The pack is found by its
barcode through the identifier index; the rest through the pack's links and the focus index, so
the answer never depends on how many packs, cycles or patients the service holds.
"""

from typing import Any

import orjson

from fhirkit.api.interactions import Result
from fhirkit.api.router import Operation, OperationCall
from fhirkit.errors import InvalidRequest, ResourceNotFound
from fhirkit.search.values import format_instant
from results_sharing.sterile import codes, links, queries, rules
from results_sharing.sterile.hooks import sterilizer_of_cycle

DEFINITION = "http://county-alliance.org/fhir/OperationDefinition/Device-trace"


async def device_trace(call: OperationCall) -> Result:
    pack = await _pack(call)
    reader = _reader(call, pack)
    parameters: list[dict[str, Any]] = [
        {"name": "pack", "resource": pack},
        {"name": "barcode", "valueString": codes.identifier_value(pack, codes.BARCODE)},
        *await _release(call.repo, pack, call.repo.config.clock()),
    ]
    pack_links = await links.of_packs(call.repo.conn, [pack["id"]], [links.LOAD, links.DELIVERY, links.USE])
    for link in pack_links:
        parameters += await _DESCRIBE[link.kind](reader, link)
    for issue in await queries.referencing(call.repo.conn, "DetectedIssue", "implicated", f"Device/{pack['id']}"):
        if await rules.read_as(reader, "DetectedIssue", issue["id"]):
            parameters.append({"name": "recall", "valueReference": {"reference": f"DetectedIssue/{issue['id']}"}})
    return Result(200, orjson.dumps({"resourceType": "Parameters", "parameter": parameters}))


def _reader(call: OperationCall, pack: dict[str, Any]) -> Any:
    """The pack's sterile supply center traces it to every patient (WS 310 makes it answer for
    them); anyone else sees the records the access policy shows it (its own deliveries and uses)."""
    center = codes.reference_of(pack.get("owner"))
    if center is not None and center == getattr(call.caller, "organization", None):
        return call.repo.unrestricted()
    return call.repo


async def _pack(call: OperationCall) -> dict[str, Any]:
    wanted = call.parameter("identifier")
    if not isinstance(wanted, str) or not wanted.strip("|"):
        raise InvalidRequest("Device/$trace needs identifier=<barcode> (or <system>|<barcode>)")
    system, _, value = wanted.rpartition("|")
    ids = await queries.ids_with_identifier(call.repo.conn, "Device", system or codes.BARCODE, value)
    for pack_id in ids:
        pack = await rules.read_local(call.repo, "Device", pack_id)
        if codes.device_kind(pack) in codes.TRACED_KINDS:
            return pack  # type: ignore[return-value]
    raise ResourceNotFound(f"No sterile pack has barcode '{value[:64]}'")


async def _release(repo: Any, pack: dict[str, Any], now: int) -> list[dict[str, Any]]:
    hold = await rules.release_hold(repo, pack, now)
    if hold is None:
        return [{"name": "released", "valueBoolean": True}]
    return [{"name": "released", "valueBoolean": False},
            {"name": "hold", "valueCoding": codes.coding(codes.RULE, hold.rule)},
            {"name": "hold-reason", "valueString": hold.message}]


async def _load(reader: Any, link: links.Link) -> list[dict[str, Any]]:
    cycle = await rules.read_as(reader, "Procedure", link.source_id)
    if cycle is None:
        return []
    part: list[dict[str, Any]] = [
        {"name": "cycle", "resource": cycle},
        {"name": "load-number", "valueString": codes.identifier_value(cycle, codes.LOAD_NUMBER)},
        {"name": "sterilizer", "valueReference": {"reference": f"Device/{sterilizer_of_cycle(cycle)}"}},
    ]
    if link.occurred is not None:
        part.append({"name": "sterilized", "valueDateTime": format_instant(link.occurred)})
    monitoring = [
        {"name": "monitoring", "resource": observation}
        for observation in await queries.referencing(reader.conn, "Observation", "focus", link.source)
        if codes.codes_in(observation.get("code"), codes.MONITORING)
        and await rules.read_as(reader, "Observation", observation["id"])
    ]
    return [{"name": "load", "part": part}, *monitoring]


async def _delivery(reader: Any, link: links.Link) -> list[dict[str, Any]]:
    delivery = await rules.read_as(reader, "SupplyDelivery", link.source_id)
    return [{"name": "delivery", "resource": delivery}] if delivery else []


async def _use(reader: Any, link: links.Link) -> list[dict[str, Any]]:
    procedure = await rules.read_as(reader, "Procedure", link.source_id)
    if procedure is None:
        return []
    part: list[dict[str, Any]] = [{"name": "procedure", "resource": procedure}]
    if link.patient:
        part.append({"name": "patient", "valueReference": {"reference": link.patient}})
    if link.organization:
        part.append({"name": "organization", "valueReference": {"reference": link.organization}})
    if link.occurred is not None:
        part.append({"name": "date", "valueDateTime": format_instant(link.occurred)})
    return [{"name": "use", "part": part}]


_DESCRIBE = {links.LOAD: _load, links.DELIVERY: _delivery, links.USE: _use}

OPERATION = Operation("trace", device_trace, ("Device",), type_level=True, methods=("GET", "POST"), writes=False,
                      definition=DEFINITION)

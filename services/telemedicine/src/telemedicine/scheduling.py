"""Scheduling the session (IHE Scheduling style): the invited party publishes `Schedule`/`Slot`s;
`Appointment/$find` proposes free slots, `Appointment/$book` (or a plain Appointment create) books
one. An Appointment for a telemedicine request is `basedOn` it, names both parties among its
participants and carries the video link in the R5 cross-version extension `virtualService`.

A Slot is booked at most once: the booking is a row in `telemedicine_slot_booking` (Slot id as
primary key) written in the Appointment's transaction, so of two concurrent bookings exactly one
commits and the other is 409. Cancelling (status cancelled, noshow, entered-in-error, or a delete)
frees the Slot; changing `Appointment.slot` (rescheduling) moves the booking. The Slot's own
`status` follows (busy/free) for readers.
"""

import uuid
from typing import Any

import orjson
from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError

from fhirkit.api.interactions import Result
from fhirkit.api.router import OperationCall
from fhirkit.errors import BusinessRuleViolation, InvalidRequest, ResourceNotFound, VersionConflict
from fhirkit.search.values import date_range
from fhirkit.store.hooks import WriteContext
from fhirkit.store.repository import Repository
from fhirkit.workflow.deadlines import search_all
from fhirkit.workflow.machine import reference_of
from servicekit.peers import SYSTEM_IDENTITY
from servicekit.tiers import organization_of
from telemedicine import invitation
from telemedicine.db import slot_booking
from telemedicine.vocabulary import VIRTUAL_SERVICE, category_of

HOLDING = {"proposed", "pending", "booked", "arrived", "checked-in", "fulfilled", "waitlist"}
RELEASED = {"cancelled", "noshow", "entered-in-error"}
FIND_LIMIT = 50


def held_slots(appointment: dict[str, Any] | None) -> set[str]:
    """The Slot ids an Appointment occupies (none once it is cancelled)."""
    if appointment is None or appointment.get("status") not in HOLDING - {"proposed", "waitlist"}:
        return set()
    return {r.split("/", 1)[1] for r in (reference_of(s) for s in appointment.get("slot") or [])
            if r and r.startswith("Slot/")}


class AppointmentHooks:
    async def before_write(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        if resource is None or resource.get("status") in RELEASED:
            return
        request = await _telemedicine_request(repo, resource)
        if request is None:
            return  # an appointment of no telemedicine request is an ordinary appointment
        await _require_both_parties(repo, resource, request)
        _require_video_link(resource)
        await _align_with_slots(repo, resource)

    async def after_write(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        before, after = held_slots(context.previous), held_slots(resource)
        for slot_id in sorted(before - after):
            await repo.conn.execute(delete(slot_booking).where(
                slot_booking.c.slot_id == slot_id, slot_booking.c.appointment_id == context.resource_id))
            await _set_slot_status(repo, slot_id, "free")
        for slot_id in sorted(after - before):
            await _book(repo, slot_id, context.resource_id)
            await _set_slot_status(repo, slot_id, "busy")


async def _book(repo: Any, slot_id: str, appointment_id: str) -> None:
    try:
        await repo.conn.execute(insert(slot_booking).values(
            slot_id=slot_id, appointment_id=appointment_id, booked_at=repo.config.clock()))
    except IntegrityError:
        raise VersionConflict(f"Slot/{slot_id} is already booked", expression=["Appointment.slot"]) from None


async def _set_slot_status(repo: Any, slot_id: str, status: str) -> None:
    # The Slot is the invited party's; its status follows a booking by either party, so the
    # platform writes it, in the booking's transaction.
    platform = Repository(repo.conn, repo.config, caller=SYSTEM_IDENTITY, in_transaction=repo.in_transaction)
    slot = (await platform.read("Slot", slot_id)).parsed()
    if slot.get("status") != status:
        await platform.update("Slot", slot_id, {**slot, "status": status})


async def _telemedicine_request(repo: Any, appointment: dict[str, Any]) -> dict[str, Any] | None:
    for based_on in appointment.get("basedOn") or []:
        reference = reference_of(based_on) or ""
        if reference.startswith("ServiceRequest/"):
            try:
                request = (await repo.read("ServiceRequest", reference.split("/", 1)[1])).parsed()
            except ResourceNotFound:
                continue  # an order held by another service (a referral's): not a telemedicine request
            if category_of(request):
                return request
    return None


async def _require_both_parties(repo: Any, appointment: dict[str, Any], request: dict[str, Any]) -> None:
    directory = repo.config.references
    present: set[str] = set()
    for participant in appointment.get("participant") or []:
        actor = reference_of(participant.get("actor")) or ""
        organization = await organization_of(directory, actor, "Appointment.participant.actor")
        if organization:
            present.add(organization)
    inviting = await organization_of(directory, reference_of(request.get("requester")) or "", "ServiceRequest.requester")
    invited = invitation.invited_organizations(request)
    missing = []
    if inviting not in present:
        missing.append(f"the inviting party {inviting}")
    if not present & set(invited):
        missing.append(f"the invited party ({' or '.join(invited)})")
    if missing:
        raise BusinessRuleViolation(
            f"An Appointment for a telemedicine request names both parties (Organization or PractitionerRole "
            f"in participant.actor); missing {' and '.join(missing)}",
            expression=["Appointment.participant"],
        )


def _require_video_link(appointment: dict[str, Any]) -> None:
    for extension in appointment.get("extension") or []:
        if extension.get("url") == VIRTUAL_SERVICE and _has_address(extension):
            return
    raise BusinessRuleViolation(
        f"A telemedicine Appointment carries its video link in the extension {VIRTUAL_SERVICE} "
        "(part addressUrl, addressString or addressContactPoint)",
        expression=["Appointment.extension"],
    )


def _has_address(extension: dict[str, Any]) -> bool:
    parts = extension.get("extension") or []
    return any(p.get("url") == "address" or str(p.get("url", "")).startswith("address") for p in parts)


async def _align_with_slots(repo: Any, appointment: dict[str, Any]) -> None:
    """A booked Appointment takes its slot's times (when it gives none) and must lie within them."""
    for reference in (reference_of(s) or "" for s in appointment.get("slot") or []):
        if not reference.startswith("Slot/"):
            continue
        slot = (await repo.read("Slot", reference.split("/", 1)[1])).parsed()
        if slot.get("status") in ("busy-unavailable", "entered-in-error"):
            raise BusinessRuleViolation(f"{reference} is {slot.get('status')}", expression=["Appointment.slot"])
        appointment.setdefault("start", slot.get("start"))
        appointment.setdefault("end", slot.get("end"))
        if not _within(appointment, slot):
            raise BusinessRuleViolation(f"The Appointment's start/end lie outside {reference}",
                                        expression=["Appointment.start"])


def _within(appointment: dict[str, Any], slot: dict[str, Any]) -> bool:
    bounds = [date_range(str(x)) for x in (appointment.get("start"), appointment.get("end"), slot.get("start"),
                                           slot.get("end"))]
    if any(b is None for b in bounds):
        return False
    start, end, slot_start, slot_end = (b[0] for b in bounds)  # type: ignore[index]
    return slot_start <= start <= end <= slot_end


class SlotHooks:
    async def before_write(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        if resource is None:
            await _refuse_if_booked(repo, context.resource_id, "deleted")
            return
        start, end = date_range(str(resource.get("start"))), date_range(str(resource.get("end")))
        if start is None or end is None or start[0] >= end[0]:
            raise BusinessRuleViolation("A Slot starts before it ends", expression=["Slot.start", "Slot.end"])
        if resource.get("status") == "free":
            await _refuse_if_booked(repo, context.resource_id, "made free")

    async def after_write(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        return None


async def _refuse_if_booked(repo: Any, slot_id: str, change: str) -> None:
    row = (await repo.conn.execute(select(slot_booking.c.appointment_id).where(slot_booking.c.slot_id == slot_id))).first()
    if row is not None:
        raise VersionConflict(
            f"Slot/{slot_id} is booked by Appointment/{row[0]}; cancel or move the appointment before it is {change}",
            expression=["Slot.status"],
        )


async def appointment_find(call: OperationCall) -> Result:
    """`Appointment/$find` (IHE ITI-115): free Slots in [start, end] as proposed Appointments."""
    start, end = call.parameter("start"), call.parameter("end")
    if not isinstance(start, str) or not isinstance(end, str) or not date_range(start) or not date_range(end):
        raise InvalidRequest("$find needs start and end (dateTime)")
    params = [("status", "free"), ("start", f"ge{start}"), ("start", f"le{end}"), ("_sort", "start")]
    schedules = await _schedules(call)
    if schedules is not None:
        if not schedules:
            return _bundle([])
        params.append(("schedule", ",".join(f"Schedule/{s['id']}" for s in schedules)))
    specialty = call.parameter("specialty")
    if isinstance(specialty, str):
        params.append(("specialty", specialty))
    slots = [m.parsed() for m in await search_all(call.repo, "Slot", params)]
    booked = await _booked(call.repo, [s["id"] for s in slots])
    free = [s for s in slots if s["id"] not in booked][:FIND_LIMIT]
    actors = await _schedule_actors(call.repo, free)
    return _bundle([_proposal(slot, actors.get(reference_of(slot.get("schedule")) or "", [])) for slot in free])


async def _schedules(call: OperationCall) -> list[dict[str, Any]] | None:
    """Schedules of the `practitioner` (PractitionerRole/Practitioner) or `organization` asked for."""
    wanted = [value for name in ("practitioner", "organization") if isinstance(value := call.parameter(name), str)]
    if not wanted:
        return None
    return [m.parsed() for m in await search_all(call.repo, "Schedule", [("actor", ",".join(wanted)), ("active", "true")])]


async def _booked(repo: Any, slot_ids: list[str]) -> set[str]:
    if not slot_ids:
        return set()
    rows = await repo.conn.execute(select(slot_booking.c.slot_id).where(slot_booking.c.slot_id.in_(slot_ids)))
    return {row[0] for row in rows}


async def _schedule_actors(repo: Any, slots: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    actors: dict[str, list[dict[str, Any]]] = {}
    for reference in {reference_of(s.get("schedule")) or "" for s in slots} - {""}:
        schedule = (await repo.read("Schedule", reference.split("/", 1)[1])).parsed()
        actors[reference] = schedule.get("actor") or []
    return actors


def _proposal(slot: dict[str, Any], actors: list[dict[str, Any]]) -> dict[str, Any]:
    proposal: dict[str, Any] = {
        "resourceType": "Appointment",
        "status": "proposed",
        "slot": [{"reference": f"Slot/{slot['id']}"}],
        "start": slot.get("start"),
        "end": slot.get("end"),
        "participant": [{"actor": actor, "status": "needs-action"} for actor in actors],
    }
    for key in ("serviceType", "specialty", "appointmentType"):
        if slot.get(key):
            proposal[key] = slot[key]
    return proposal


def _bundle(appointments: list[dict[str, Any]]) -> Result:
    entries = [{"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": a, "search": {"mode": "match"}} for a in appointments]
    body = {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries}
    return Result(200, orjson.dumps(body))


async def appointment_book(call: OperationCall) -> Result:
    """`Appointment/$book` (IHE ITI-117): the Appointment (Parameters `appt-resource`, or the body
    itself) is created `booked`; the answer is a Bundle holding it."""
    appointment = call.parameter("appt-resource")
    if appointment is None and isinstance(call.body, dict) and call.body.get("resourceType") == "Appointment":
        appointment = call.body
    if not isinstance(appointment, dict) or appointment.get("resourceType") != "Appointment":
        raise InvalidRequest("$book takes an Appointment (Parameters 'appt-resource' or the body itself)")
    if not appointment.get("slot"):
        raise BusinessRuleViolation("$book books a Slot: Appointment.slot is required", expression=["Appointment.slot"])
    body = {k: v for k, v in appointment.items() if k not in ("id", "meta")}
    body["status"] = "booked"
    outcome = await call.repo.create(body)
    booked = outcome.stored.parsed()
    bundle = {"resourceType": "Bundle", "type": "searchset", "total": 1, "entry": [{
        "fullUrl": f"{call.options.base}/Appointment/{booked['id']}", "resource": booked, "search": {"mode": "match"}}]}
    return Result(200, orjson.dumps(bundle))

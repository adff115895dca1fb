"""Store hooks of sterile supply traceability: what a sterile-supply write must carry.

Each hook class handles the sterile-supply resources of its type and hands every other resource
of that type to the hooks the service had before (`fallback`), so the lab/imaging rules on
Observation and Procedure keep working unchanged. A resource is sterile supply when:
  Device         its `type` has a code of …/CodeSystem/sterile-device-kind;
  Observation    its `code` has a code of …/CodeSystem/sterilization-monitoring;
  Procedure      its `code` is sterilization-cycle, or its `focalDevice` names a pack or implant;
  SupplyDelivery its `suppliedItem.itemReference` is a pack or implant.
Checks run in `before_write` (a refusal rolls back the whole request or transaction); the pack
links and the automatic recall are written in `after_write`, in the same database transaction.
"""

from typing import Any, cast

from fhirkit.errors import DuplicateResource, UnprocessableEntity
from fhirkit.search.values import format_instant
from fhirkit.store.hooks import BatchHooks, NoHooks, ResourceHooks, WriteContext, creates_together
from results_sharing.sterile import codes, links, queries, recall
from results_sharing.sterile.rules import (
    moment,
    read_local,
    release_hold,
    require_retained,
    start_of,
    violation,
)

NOT_HAPPENED = {"entered-in-error", "not-done", "abandoned", "preparation"}  # statuses that state no link
LABEL = ("identifier", "lotNumber", "manufactureDate", "extension", "type")


def with_sterile_supply(hooks: dict[str, ResourceHooks]) -> dict[str, ResourceHooks]:
    """The service's hooks with sterile supply in front of Device, Observation, Procedure and SupplyDelivery."""
    composed = dict(hooks)
    for resource_type, wrapper in WRAPPERS.items():
        composed[resource_type] = wrapper(hooks.get(resource_type))
    return composed


class _Dispatch:
    """Sterile-supply resources here, the rest to the hooks the type had before."""

    def __init__(self, fallback: ResourceHooks | None = None) -> None:
        self.fallback: ResourceHooks = fallback or NoHooks()

    async def owns(self, repo: Any, resource: dict[str, Any]) -> bool:
        raise NotImplementedError

    async def before_write(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        current = resource if resource is not None else context.previous
        if current is not None and await self.owns(repo, current):
            await self.check(repo, resource, context)
        else:
            await self.fallback.before_write(repo, resource, context)

    async def after_write(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        # A version that stops being sterile supply (a use record losing its pack) must drop its links.
        stated = [r for r in (resource, context.previous) if r is not None]
        if any([await self.owns(repo, r) for r in stated]):
            await self.record(repo, resource, context)
        else:
            await self.fallback.after_write(repo, resource, context)

    async def check(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        raise NotImplementedError

    async def record(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        return None


# --- Device: sterilizers, packs and implants ------------------------------------------------


class DeviceHooks(_Dispatch):
    async def owns(self, repo: Any, resource: dict[str, Any]) -> bool:
        return bool(codes.codes_in(resource.get("type"), codes.DEVICE_KIND))

    async def check(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        loaded = await links.of_packs(repo.conn, [context.resource_id], [links.LOAD])
        if resource is None:
            if loaded:
                require_retained(loaded[0].occurred, repo.config.clock(), f"Device/{context.resource_id} (in a load)",
                                 ["Device"])
            return
        kind = _device_kind(resource)
        if context.previous is not None and loaded:
            _require_same_label(resource, context.previous)
        if kind == codes.STERILIZER:
            _check_sterilizer(resource)
        else:
            await _check_pack(repo, resource)


def _device_kind(device: dict[str, Any]) -> str:
    kinds = codes.codes_in(device.get("type"), codes.DEVICE_KIND)
    known = kinds & {codes.STERILIZER, *codes.TRACED_KINDS}
    if len(kinds) != 1 or not known:
        raise UnprocessableEntity(
            f"Device.type must carry exactly one code of {codes.DEVICE_KIND} (sterilizer, pack, implant); "
            f"found {sorted(kinds)}",
            expression=["Device.type"],
        )
    return known.pop()


def _require_same_label(device: dict[str, Any], previous: dict[str, Any]) -> None:
    """A pack's label (barcode, sterilizer, load, date, kind) is what tracing follows once it is in a load."""
    changed = [name for name in LABEL if device.get(name) != previous.get(name)]
    if changed:
        raise UnprocessableEntity(
            f"The label of a pack already in a load cannot change ({', '.join(changed)}); label a new pack instead",
            expression=[f"Device.{name}" for name in changed],
        )


def _check_sterilizer(device: dict[str, Any]) -> None:
    missing = [name for name, present in (
        (f"identifier with system {codes.STERILIZER_NUMBER} (灭菌器编号)",
         codes.identifier_value(device, codes.STERILIZER_NUMBER)),
        ("owner (the sterile supply center)", codes.local_id(codes.reference_of(device.get("owner")), "Organization")),
    ) if not present]
    if missing:
        raise UnprocessableEntity(f"A sterilizer needs {' and '.join(missing)}", expression=["Device"])


async def _check_pack(repo: Any, device: dict[str, Any]) -> None:
    barcode = codes.identifier_value(device, codes.BARCODE)
    sterilizer = sterilizer_of_pack(device)
    missing = [name for name, present in (
        (f"identifier with system {codes.BARCODE} (the label's barcode)", barcode),
        (f"extension {codes.STERILIZER_EXTENSION} (valueReference to the sterilizer Device)", sterilizer),
        ("lotNumber (the load number)", device.get("lotNumber")),
        ("manufactureDate (the sterilization date)", moment(device.get("manufactureDate"))),
        ("expirationDate", moment(device.get("expirationDate"))),
    ) if not present]
    if missing:
        raise UnprocessableEntity(f"A sterile pack needs {'; '.join(missing)}", expression=["Device"])
    if (moment(device["expirationDate"]) or 0) <= (moment(device["manufactureDate"]) or 0):
        raise UnprocessableEntity("Device.expirationDate must be after manufactureDate (the sterilization date)",
                                  expression=["Device.expirationDate"])
    await require_sterilizer(repo, sterilizer, "Device.extension")
    others = set(await queries.ids_with_identifier(repo.conn, "Device", codes.BARCODE, str(barcode))) - {device["id"]}
    if others:
        raise DuplicateResource(f"Barcode {barcode} already labels Device/{min(others)}",
                                expression=["Device.identifier"])


def sterilizer_of_pack(device: dict[str, Any]) -> str | None:
    for extension in device.get("extension") or []:
        if isinstance(extension, dict) and extension.get("url") == codes.STERILIZER_EXTENSION:
            return codes.local_id(codes.reference_of(extension.get("valueReference")), "Device")
    return None


async def require_sterilizer(repo: Any, sterilizer_id: str | None, expression: str) -> dict[str, Any]:
    device = await read_local(repo, "Device", sterilizer_id)
    if device is None or codes.device_kind(device) != codes.STERILIZER:
        what = "does not exist" if device is None else "is not a sterilizer"
        raise UnprocessableEntity(f"Device/{sterilizer_id} {what}", expression=[expression])
    return device


async def require_pack(repo: Any, pack_id: str | None, expression: str) -> dict[str, Any]:
    device = await read_local(repo, "Device", pack_id)
    if device is None or codes.device_kind(device) not in codes.TRACED_KINDS:
        what = "does not exist" if device is None else "is not a sterile pack or implant"
        raise UnprocessableEntity(f"Device/{pack_id} {what}", expression=[expression])
    return device


# --- Observation: physical, chemical, Bowie-Dick and biological monitoring -------------------


class ObservationHooks(_Dispatch):
    async def owns(self, repo: Any, resource: dict[str, Any]) -> bool:
        return _is_monitoring(resource)

    def creates_together(self, resource: dict[str, Any]) -> bool:
        # A monitoring result is judged against its cycle and a failed one opens a recall: alone.
        return not _is_monitoring(resource) and creates_together(self.fallback, resource)

    async def before_creates(self, repo: Any, resources: list[dict[str, Any]]) -> None:
        await cast(BatchHooks, self.fallback).before_creates(repo, resources)

    async def after_creates(self, repo: Any, resources: list[dict[str, Any]], contexts: list[WriteContext]) -> None:
        await cast(BatchHooks, self.fallback).after_creates(repo, resources, contexts)

    async def check(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        if resource is None:
            previous = context.previous or {}
            require_retained(start_of(previous, "effective"), repo.config.clock(),
                             f"Observation/{context.resource_id} (monitoring)", ["Observation"])
            return
        kind = _monitoring_kind(resource)
        if start_of(resource, "effective") is None:
            raise UnprocessableEntity("A monitoring result needs effectiveDateTime (when it was read)",
                                      expression=["Observation.effective"])
        _check_result(resource)
        cycle = await _monitored_cycle(repo, resource, kind)
        await _check_device(repo, resource, cycle)

    async def record(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        if resource is not None and recall.is_failed_biological_indicator(resource):
            await recall.open_recall(repo, resource)


def _is_monitoring(observation: dict[str, Any]) -> bool:
    return bool(codes.codes_in(observation.get("code"), codes.MONITORING))


def _monitoring_kind(observation: dict[str, Any]) -> str:
    kinds = codes.codes_in(observation.get("code"), codes.MONITORING)
    known = {codes.PHYSICAL, codes.CHEMICAL, codes.BOWIE_DICK, codes.BIOLOGICAL}
    if len(kinds) != 1 or not kinds <= known:
        raise UnprocessableEntity(
            f"Observation.code must carry exactly one of {', '.join(sorted(known))} ({codes.MONITORING})",
            expression=["Observation.code"],
        )
    return kinds.pop()


def _check_result(observation: dict[str, Any]) -> None:
    if observation.get("status") not in queries.FINAL_STATUSES:
        return  # a BI still incubating has no result yet
    results = codes.codes_in(observation.get("valueCodeableConcept"), codes.RESULT)
    if len(results) != 1 or not results <= {codes.PASS, codes.FAIL}:
        raise UnprocessableEntity(
            f"A final monitoring result needs valueCodeableConcept with pass or fail ({codes.RESULT})",
            expression=["Observation.value"],
        )


async def _monitored_cycle(repo: Any, observation: dict[str, Any], kind: str) -> dict[str, Any] | None:
    focus = [codes.reference_of(f) for f in observation.get("focus") or []]
    if not focus:
        if kind in codes.LOAD_MONITORING:
            raise UnprocessableEntity(f"A {kind} monitoring result needs focus: the cycle Procedure it monitored",
                                      expression=["Observation.focus"])
        return None
    cycle_id = codes.local_id(focus[0], "Procedure") if len(focus) == 1 else None
    cycle = await read_local(repo, "Procedure", cycle_id)
    if cycle is None or not is_cycle(cycle):
        raise UnprocessableEntity(f"Observation.focus must be one sterilization cycle Procedure; {focus} is not",
                                  expression=["Observation.focus"])
    return cycle


async def _check_device(repo: Any, observation: dict[str, Any], cycle: dict[str, Any] | None) -> None:
    named = codes.local_id(codes.reference_of(observation.get("device")), "Device")
    expected = sterilizer_of_cycle(cycle) if cycle is not None else None
    if named is None and expected is not None:
        observation["device"] = {"reference": f"Device/{expected}"}  # the cycle already says which sterilizer
        return
    if expected is not None and named != expected:
        raise UnprocessableEntity(f"Observation.device must be the cycle's sterilizer Device/{expected}",
                                  expression=["Observation.device"])
    if named is None:
        raise UnprocessableEntity("A Bowie-Dick test needs device: the sterilizer tested", expression=["Observation.device"])
    await require_sterilizer(repo, named, "Observation.device")


# --- Procedure: sterilization cycles and uses on patients ------------------------------------


def is_cycle(procedure: dict[str, Any]) -> bool:
    return codes.CYCLE in codes.codes_in(procedure.get("code"), codes.PROCEDURE)


def sterilizer_of_cycle(cycle: dict[str, Any]) -> str | None:
    devices = [codes.local_id(codes.reference_of(p.get("actor")), "Device")
               for p in cycle.get("performer") or [] if isinstance(p, dict)]
    return next((d for d in devices if d), None)


def load_of_cycle(cycle: dict[str, Any]) -> list[str]:
    """The pack ids of the cycle's load: the members of the contained Group its subject points at."""
    group = _contained(cycle, codes.reference_of(cycle.get("subject")))
    members = [codes.reference_of(m.get("entity")) for m in (group or {}).get("member") or [] if isinstance(m, dict)]
    return [codes.local_id(m, "Device") or str(m) for m in members]


def _contained(resource: dict[str, Any], reference: str | None) -> dict[str, Any] | None:
    if not reference or not reference.startswith("#"):
        return None
    return next((c for c in resource.get("contained") or [] if isinstance(c, dict) and c.get("id") == reference[1:]),
                None)


def used_devices(procedure: dict[str, Any]) -> list[str | None]:
    return [codes.local_id(codes.reference_of(f.get("manipulated")), "Device")
            for f in procedure.get("focalDevice") or [] if isinstance(f, dict)]


class ProcedureHooks(_Dispatch):
    async def owns(self, repo: Any, resource: dict[str, Any]) -> bool:
        if is_cycle(resource):
            return True
        for device_id in used_devices(resource):
            device = await read_local(repo, "Device", device_id)
            if codes.device_kind(device) in codes.TRACED_KINDS:
                return True
        return False

    async def check(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        current = resource if resource is not None else context.previous or {}
        if is_cycle(current):
            await _check_cycle(repo, resource, context)
        elif resource is not None and resource.get("status") not in NOT_HAPPENED:
            await _check_use(repo, resource)

    async def record(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        stated = await _procedure_links(repo, resource) if resource is not None else []
        await links.replace(repo.conn, "Procedure", context.resource_id, stated)


async def _check_cycle(repo: Any, cycle: dict[str, Any] | None, context: WriteContext) -> None:
    if cycle is None:
        require_retained(start_of(context.previous or {}, "performed"), repo.config.clock(),
                         f"Procedure/{context.resource_id} (sterilization cycle)", ["Procedure"])
        return
    sterilizer_id = sterilizer_of_cycle(cycle)
    if sterilizer_id is None:
        raise UnprocessableEntity("A sterilization cycle needs performer.actor: the sterilizer Device",
                                  expression=["Procedure.performer"])
    await require_sterilizer(repo, sterilizer_id, "Procedure.performer")
    load_number = codes.identifier_value(cycle, codes.LOAD_NUMBER)
    if load_number is None or start_of(cycle, "performed") is None:
        raise UnprocessableEntity(
            f"A sterilization cycle needs identifier with system {codes.LOAD_NUMBER} (the load number) and "
            "performedDateTime or performedPeriod.start",
            expression=["Procedure.identifier", "Procedure.performed"],
        )
    others = set(await queries.cycles_with_load_number(repo.conn, sterilizer_id, load_number)) - {cycle["id"]}
    if others:
        raise DuplicateResource(f"Load {load_number} of Device/{sterilizer_id} is already Procedure/{min(others)}",
                                expression=["Procedure.identifier"])
    await _check_load(repo, cycle, sterilizer_id, load_number)


async def _check_load(repo: Any, cycle: dict[str, Any], sterilizer_id: str, load_number: str) -> None:
    group = _contained(cycle, codes.reference_of(cycle.get("subject")))
    if group is None or group.get("resourceType") != "Group" or group.get("type") != "device":
        raise UnprocessableEntity(
            "A sterilization cycle's subject is its load: a reference to a contained Group of type 'device' "
            "whose members are the pack Devices",
            expression=["Procedure.subject"],
        )
    pack_ids = load_of_cycle(cycle)
    for index, pack_id in enumerate(pack_ids):
        where = f"Procedure.contained.member[{index}]"
        pack = await require_pack(repo, pack_id, where)
        if sterilizer_of_pack(pack) != sterilizer_id or pack.get("lotNumber") != load_number:
            raise UnprocessableEntity(
                f"Device/{pack_id} is labelled for sterilizer Device/{sterilizer_of_pack(pack)} load "
                f"{pack.get('lotNumber')}, not Device/{sterilizer_id} load {load_number}",
                expression=[where],
            )
    elsewhere = [link for link in await links.of_packs(repo.conn, pack_ids, [links.LOAD])
                 if link.source_id != cycle["id"]]
    if elsewhere:
        raise UnprocessableEntity(f"Device/{elsewhere[0].pack_id} is already in the load of {elsewhere[0].source}",
                                  expression=["Procedure.contained"])


async def _check_use(repo: Any, procedure: dict[str, Any]) -> None:
    if codes.local_id(codes.reference_of(procedure.get("subject")), "Patient") is None:
        raise UnprocessableEntity("A procedure using a sterile pack needs subject: the Patient",
                                  expression=["Procedure.subject"])
    used_at = start_of(procedure, "performed")
    if used_at is None:
        raise UnprocessableEntity("A procedure using a sterile pack needs performedDateTime or performedPeriod.start",
                                  expression=["Procedure.performed"])
    if _using_site(repo, procedure) is None:
        raise UnprocessableEntity("A procedure using a sterile pack needs performer.onBehalfOf: the using Organization",
                                  expression=["Procedure.performer"])
    for index, device_id in enumerate(used_devices(procedure)):
        where = f"Procedure.focalDevice[{index}].manipulated"
        device = await read_local(repo, "Device", device_id)
        if codes.device_kind(device) not in codes.TRACED_KINDS:
            continue  # other devices (a pacemaker from a supplier) are not traced here
        await require_released(repo, device or {}, used_at, "used", where)
        opened = [link for link in await links.of_packs(repo.conn, [str(device_id)], [links.USE])
                  if link.source_id != procedure["id"]]
        if opened:
            raise violation("single-use", f"Device/{device_id} was already used in {opened[0].source}", [where])


def _using_site(repo: Any, procedure: dict[str, Any]) -> str | None:
    """The Organization that used the pack: the performer's, else the caller's (the using site posts it)."""
    for performer in procedure.get("performer") or []:
        for key in ("onBehalfOf", "actor"):
            reference = codes.reference_of((performer or {}).get(key))
            if codes.local_id(reference, "Organization"):
                return reference
    owner = getattr(repo, "owner", None)
    return owner if isinstance(owner, str) and owner.startswith("Organization/") else None


async def require_released(repo: Any, pack: dict[str, Any], at: int, action: str, where: str) -> None:
    hold = await release_hold(repo, pack, at)
    if hold is not None:
        raise violation(hold.rule, f"Device/{pack.get('id')} cannot be {action}: {hold.message}", [where])


def _states_links(procedure: dict[str, Any]) -> bool:
    """A cycle being loaded (preparation) already holds its packs; a use not done touched no one."""
    status = procedure.get("status")
    if is_cycle(procedure):
        return status not in ("entered-in-error", "not-done")
    return status not in NOT_HAPPENED


async def _procedure_links(repo: Any, procedure: dict[str, Any]) -> list[links.Link]:
    if not _states_links(procedure):
        return []
    if is_cycle(procedure):
        sterilizer_id = sterilizer_of_cycle(procedure)
        started = start_of(procedure, "performed")
        return [links.Link(links.LOAD, "Procedure", procedure["id"], pack_id, sterilizer_id=sterilizer_id,
                           occurred=started) for pack_id in load_of_cycle(procedure)]
    site, patient = _using_site(repo, procedure), codes.reference_of(procedure.get("subject"))
    used_at = start_of(procedure, "performed")
    found = []
    for device_id in used_devices(procedure):
        device = await read_local(repo, "Device", device_id)
        if device_id and codes.device_kind(device) in codes.TRACED_KINDS:
            found.append(links.Link(links.USE, "Procedure", procedure["id"], device_id, organization=site,
                                    patient=patient, occurred=used_at))
    return found


# --- SupplyDelivery: distribution to township centers ----------------------------------------


def delivered_item(delivery: dict[str, Any]) -> str | None:
    return codes.local_id(codes.reference_of((delivery.get("suppliedItem") or {}).get("itemReference")), "Device")


class SupplyDeliveryHooks(_Dispatch):
    async def owns(self, repo: Any, resource: dict[str, Any]) -> bool:
        device = await read_local(repo, "Device", delivered_item(resource))
        return codes.device_kind(device) in codes.TRACED_KINDS

    async def check(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        if resource is None or resource.get("status") in NOT_HAPPENED:
            return
        receivers = [codes.reference_of(r) for r in resource.get("receiver") or []]
        if len(receivers) != 1 or not codes.local_id(receivers[0], "Organization"):
            raise UnprocessableEntity("A sterile pack delivery needs exactly one receiver: the receiving Organization",
                                      expression=["SupplyDelivery.receiver"])
        delivered_at = start_of(resource, "occurrence")
        if delivered_at is None:
            delivered_at = repo.config.clock()
            resource["occurrenceDateTime"] = format_instant(delivered_at)  # delivered now, as posted
        pack = await require_pack(repo, delivered_item(resource), "SupplyDelivery.suppliedItem.itemReference")
        await require_released(repo, pack, delivered_at, "distributed", "SupplyDelivery.suppliedItem.itemReference")

    async def record(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        stated = []
        if resource is not None and resource.get("status") not in NOT_HAPPENED:
            stated.append(links.Link(links.DELIVERY, "SupplyDelivery", resource["id"], str(delivered_item(resource)),
                                     organization=codes.reference_of((resource.get("receiver") or [{}])[0]),
                                     occurred=start_of(resource, "occurrence")))
        await links.replace(repo.conn, "SupplyDelivery", context.resource_id, stated)


WRAPPERS = {
    "Device": DeviceHooks,
    "Observation": ObservationHooks,
    "Procedure": ProcedureHooks,
    "SupplyDelivery": SupplyDeliveryHooks,
}

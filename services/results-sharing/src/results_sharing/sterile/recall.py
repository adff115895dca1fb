"""The automatic recall on a failed biological indicator (WS 310.3: 生物监测不合格的召回).

Every pack the sterilizer sterilized since the start of its last cycle whose biological
indicator passed (before the failing cycle) is recalled: unused packs are withdrawn wherever they
are, used packs are listed with the patients they touched, at every institution. The recall is
written by the store hook of the failing Observation, in its database transaction, so a recorded
failure without its recall cannot exist:
  DetectedIssue  sterilization-failure, implicating the Observation, the sterilizer, the cycles
                 and every pack;
  Task           code recall owned by the sterile supply center (everything), and one Task per
                 other institution holding or having used recalled packs (`partOf` the first);
  Flag           one per exposed patient (密切观察), pointing at the DetectedIssue.
"""

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from fhirkit.access import grant_access
from fhirkit.errors import UnprocessableEntity
from fhirkit.search.values import format_instant
from results_sharing.access import RESULTS_SCOPE
from results_sharing.sterile import codes, links, queries
from results_sharing.sterile.rules import read_local, start_of

FLAG_CATEGORY = "http://terminology.hl7.org/CodeSystem/flag-category"


@dataclass
class Exposure:
    """What the recall must reach, per pack and per institution."""

    authority: str  # the sterile supply center owning the sterilizer
    cycles: list[str] = field(default_factory=list)
    withdraw: dict[str, str] = field(default_factory=dict)  # unused pack id → institution holding it
    used: dict[str, list[links.Link]] = field(default_factory=dict)  # used pack id → its uses

    def patients(self, organization: str | None = None) -> list[str]:
        return sorted({u.patient for uses in self.used.values() for u in uses
                       if u.patient and organization in (None, u.organization)})

    def institutions(self) -> list[str]:
        places = set(self.withdraw.values()) | {u.organization for uses in self.used.values() for u in uses
                                                if u.organization}
        return sorted(places - {self.authority})


def is_failed_biological_indicator(observation: dict[str, Any]) -> bool:
    return (
        codes.BIOLOGICAL in codes.codes_in(observation.get("code"), codes.MONITORING)
        and observation.get("status") in queries.FINAL_STATUSES
        and codes.FAIL in codes.codes_in(observation.get("valueCodeableConcept"), codes.RESULT)
    )


async def open_recall(repo: Any, observation: dict[str, Any]) -> str | None:
    """Open the recall of a failed biological indicator once; returns the DetectedIssue id."""
    failure = f"Observation/{observation['id']}"
    if await queries.referencing(repo.conn, "DetectedIssue", "implicated", failure):
        return None  # already opened by an earlier version of this result
    cycle_id = codes.local_id(codes.reference_of((observation.get("focus") or [{}])[0]), "Procedure")
    cycle = await read_local(repo, "Procedure", cycle_id) or {}
    sterilizer_id = codes.local_id(codes.reference_of(observation.get("device")), "Device")
    sterilizer = await read_local(repo, "Device", sterilizer_id) or {}
    failed_at = start_of(cycle, "performed")
    if sterilizer_id is None or failed_at is None:
        raise UnprocessableEntity("A failed biological indicator must name its cycle and sterilizer",
                                  expression=["Observation.focus"])
    since = await queries.last_passing_cycle_start(repo.conn, sterilizer_id, failed_at)
    exposure = await _exposure(repo, sterilizer, since)
    issue = await _create_issue(repo, observation, sterilizer, cycle, since, exposure)
    await _create_tasks(repo, issue, exposure)
    await _create_flags(repo, issue, exposure)
    return str(issue["id"])


async def _exposure(repo: Any, sterilizer: dict[str, Any], since: int | None) -> Exposure:
    authority = codes.reference_of(sterilizer.get("owner")) or "Organization/unknown"
    loaded = await links.loads_since(repo.conn, sterilizer["id"], since)
    exposure = Exposure(authority, cycles=sorted({link.source_id for link in loaded}))
    events = await links.of_packs(repo.conn, [link.pack_id for link in loaded], [links.DELIVERY, links.USE])
    holder: dict[str, str] = {}
    for event in events:  # oldest first: the last delivery says where an unused pack is now
        if event.kind == links.USE:
            exposure.used.setdefault(event.pack_id, []).append(event)
        elif event.organization:
            holder[event.pack_id] = event.organization
    for link in loaded:
        if link.pack_id not in exposure.used:
            exposure.withdraw[link.pack_id] = holder.get(link.pack_id, authority)
    return exposure


async def _create_issue(
    repo: Any, observation: dict[str, Any], sterilizer: dict[str, Any], cycle: dict[str, Any],
    since: int | None, exposure: Exposure,
) -> dict[str, Any]:
    packs = sorted([*exposure.withdraw, *exposure.used])
    number = codes.identifier_value(sterilizer, codes.STERILIZER_NUMBER) or sterilizer["id"]
    load = codes.identifier_value(cycle, codes.LOAD_NUMBER) or cycle.get("id")
    window = f"自上次生物监测合格（{format_instant(since)}）以来" if since is not None else "（此前无合格生物监测）全部"
    detail = (
        f"灭菌器 {number} 批次 {load} 生物监测不合格：召回该灭菌器{window}灭菌的器械包 {len(packs)} 个，"
        f"其中未使用 {len(exposure.withdraw)} 个须撤回，已使用 {len(exposure.used)} 个，"
        f"涉及患者 {len(exposure.patients())} 人，需密切观察。"
    )
    implicated = [f"Observation/{observation['id']}", f"Device/{sterilizer['id']}",
                  *(f"Procedure/{c}" for c in exposure.cycles), *(f"Device/{p}" for p in packs)]
    issue = {
        "resourceType": "DetectedIssue",
        "status": "final",
        "code": codes.concept(codes.ISSUE, codes.FAILURE),
        "severity": "high",
        "identifiedDateTime": format_instant(repo.config.clock()),
        "implicated": [{"reference": reference} for reference in implicated],
        "evidence": [{"detail": [{"reference": f"Observation/{observation['id']}"}]}],
        "detail": detail,
    }
    return (await repo.create(issue)).stored.parsed()


async def _create_tasks(repo: Any, issue: dict[str, Any], exposure: Exposure) -> None:
    parent = await repo.create(_task(repo, issue, exposure, exposure.authority, None))
    parent_id = parent.stored.resource_id
    for organization in exposure.institutions():
        await repo.create(_task(repo, issue, exposure, organization, parent_id))


def _task(repo: Any, issue: dict[str, Any], exposure: Exposure, owner: str, parent: str | None) -> dict[str, Any]:
    everything = parent is None  # the center's task lists the whole recall; an institution's, its part
    withdraw = sorted(p for p, held in exposure.withdraw.items() if everything or held == owner)
    used = sorted(p for p, uses in exposure.used.items() if everything or any(u.organization == owner for u in uses))
    patients = exposure.patients(None if everything else owner)
    inputs = [*_inputs(codes.WITHDRAW, [f"Device/{p}" for p in withdraw]),
              *_inputs(codes.USED, [f"Device/{p}" for p in used]), *_inputs(codes.EXPOSED, patients)]
    now = format_instant(repo.config.clock())
    task: dict[str, Any] = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "priority": "urgent",
        "code": {"coding": [{"system": codes.TASK_CODE, "code": codes.RECALL, "display": "召回"}]},
        "description": f"灭菌失败召回：撤回未使用器械包 {len(withdraw)} 个，已使用 {len(used)} 个，"
                       f"密切观察患者 {len(patients)} 人",
        "focus": {"reference": f"DetectedIssue/{issue['id']}"},
        "requester": {"reference": exposure.authority},
        "owner": {"reference": owner},
        "authoredOn": now,
        "lastModified": now,
        "input": inputs,
    }
    if parent is not None:
        task["partOf"] = [{"reference": f"Task/{parent}"}]
    return task


def _inputs(item: str, references: list[str]) -> list[dict[str, Any]]:
    return [{"type": codes.concept(codes.RECALL_ITEM, item), "valueReference": {"reference": r}} for r in references]


async def _create_flags(repo: Any, issue: dict[str, Any], exposure: Exposure) -> None:
    packs_of: dict[str, list[str]] = defaultdict(list)
    sites_of: dict[str, set[str]] = defaultdict(set)
    for pack_id, uses in exposure.used.items():
        for use in uses:
            if use.patient:
                packs_of[use.patient].append(pack_id)
                if use.organization:
                    sites_of[use.patient].add(use.organization)
    now = format_instant(repo.config.clock())
    for patient, packs in sorted(packs_of.items()):
        flag = {
            "resourceType": "Flag",
            "extension": [{"url": codes.FLAG_DETAIL, "valueReference": {"reference": f"DetectedIssue/{issue['id']}"}}],
            "status": "active",
            "category": [{"coding": [{"system": FLAG_CATEGORY, "code": "clinical", "display": "Clinical"}]}],
            "code": {**codes.concept(codes.ISSUE, codes.EXPOSURE),
                     "text": f"使用了灭菌失败批次的器械包（{', '.join(sorted(packs))}），请密切观察感染征象"},
            "subject": {"reference": patient},
            "period": {"start": now},
            "author": {"reference": exposure.authority},
        }
        created = (await repo.create(flag)).stored
        await _show_flag_to_sites(repo, created.resource_id, patient, sites_of[patient] - {exposure.authority})


async def _show_flag_to_sites(repo: Any, flag_id: str, patient: str, sites: set[str]) -> None:
    """The health centers that used the packs on the patient read the Flag the center raised."""
    for site in sorted(sites):
        await grant_access(repo.conn, grantee=site, patient=patient, scope=RESULTS_SCOPE,
                           source=f"recall#{site}", reason="sterilization recall", expires_at=None,
                           now=repo.config.clock(), targets=[("Flag", flag_id)])

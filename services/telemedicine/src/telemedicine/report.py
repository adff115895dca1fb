"""The signed report that completes a telemedicine Task (会诊意见 / 诊断报告).

The report is held by results sharing: a DiagnosticReport for remote diagnosis, a consult note
(DocumentReference or Composition) for a teleconsultation. `$complete` names it in `output`; the
report must be about the Task's patient, a remote imaging/ECG report must link the ImagingStudy or
Observation the request asked to be read, and results sharing must hold a Provenance targeting
the report with a `signature` by the assigned practitioner (the PractitionerRole that
`$assign-practitioner` put into the request's performers, or its Practitioner) as `agent.who` or
`signature.who`.
"""

from typing import Any

from fhirkit.errors import BusinessRuleViolation
from fhirkit.workflow.machine import Transition, reference_of
from telemedicine.vocabulary import REMOTE_DIAGNOSIS, task_code

REPORT_TYPES = {REMOTE_DIAGNOSIS: ("DiagnosticReport",), "teleconsultation": ("DocumentReference", "Composition")}
LINKED_MATERIAL = {"remote-imaging": "ImagingStudy", "remote-ecg": "Observation"}
REPORT_HOLDER = "results-sharing"


def assigned_practitioner(request: dict[str, Any]) -> str | None:
    roles = [r for r in (reference_of(p) for p in request.get("performer") or []) if r and r.startswith("PractitionerRole/")]
    return roles[-1] if roles else None


async def focus_request(repo: Any, task: dict[str, Any]) -> dict[str, Any]:
    focus = reference_of(task.get("focus")) or ""
    if not focus.startswith("ServiceRequest/"):
        raise BusinessRuleViolation("A telemedicine Task's focus is its ServiceRequest", expression=["Task.focus"])
    return (await repo.read("ServiceRequest", focus.split("/", 1)[1])).parsed()


async def require_signed_report(repo: Any, move: Transition, task: dict[str, Any], previous: dict[str, Any]) -> None:
    request = await focus_request(repo, task)
    kinds = REPORT_TYPES[task_code(task) or REMOTE_DIAGNOSIS]
    reports = [r for r in (reference_of(o.get("valueReference")) or "" for o in task.get("output") or [])
               if r.split("/", 1)[0] in kinds]
    if not reports:
        raise BusinessRuleViolation(f"$complete needs the signed report as a {' or '.join(kinds)} in Task.output",
                                    expression=["Task.output"])
    practitioner = assigned_practitioner(request)
    if practitioner is None:
        raise BusinessRuleViolation("The report is signed by the assigned practitioner: $assign-practitioner first",
                                    expression=["Task.focus"])
    report_reference = reports[-1]
    report = await _read(repo, report_reference)
    _check_report(report, report_reference, task, request)
    await _require_signature(repo, report_reference, practitioner)


async def _read(repo: Any, reference: str) -> dict[str, Any]:
    resource_type, resource_id = reference.split("/", 1)
    found = await repo.config.references.read(resource_type, resource_id)
    if found is None:
        raise BusinessRuleViolation(f"{reference} does not exist", expression=["Task.output"])
    return found


def _check_report(report: dict[str, Any], reference: str, task: dict[str, Any], request: dict[str, Any]) -> None:
    about = reference_of(report.get("subject"))
    if about != reference_of(task.get("for")):
        raise BusinessRuleViolation(f"{reference} is about {about}, not the Task's patient", expression=["Task.output"])
    category = next((c.get("code") for concept in request.get("category") or [] for c in concept.get("coding") or []), None)
    wanted = LINKED_MATERIAL.get(str(category))
    if wanted is None:
        return
    asked = {reference_of(i) for i in request.get("supportingInfo") or []}
    linked = {reference_of(r) for r in [*(report.get("imagingStudy") or []), *(report.get("result") or [])]}
    if not {r for r in asked & linked if r and r.startswith(f"{wanted}/")}:
        raise BusinessRuleViolation(
            f"A {category} report links the {wanted} it reads (DiagnosticReport.imagingStudy or .result): "
            f"one of {', '.join(sorted(r for r in asked if r and r.startswith(wanted)))}",
            expression=["Task.output"],
        )


async def _require_signature(repo: Any, report: str, practitioner: str) -> None:
    directory = repo.config.references
    role = await directory.read("PractitionerRole", practitioner.split("/", 1)[1]) or {}
    signers = {practitioner, reference_of(role.get("practitioner"))} - {None}
    records = await directory.search("Provenance", [("target", report), ("_count", "50")], service=REPORT_HOLDER)
    for record in records:
        if not record.get("signature"):
            continue
        who = {reference_of(a.get("who")) for a in record.get("agent") or []}
        who |= {reference_of(s.get("who")) for s in record.get("signature") or []}
        if who & signers:
            return
    raise BusinessRuleViolation(
        f"{report} has no signature by the assigned practitioner {practitioner}: results sharing holds no "
        f"Provenance targeting it with a signature by {' or '.join(sorted(str(s) for s in signers))}",
        expression=["Task.output"],
    )

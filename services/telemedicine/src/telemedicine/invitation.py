"""What a telemedicine ServiceRequest (the invitation, 远程医疗邀请) must carry, the patient's consent
it needs, and where it may go (远程医疗服务管理规范（试行）2018; DOMAIN.md §4).

The invitation content the rules require, in standard elements:

| content (规范) | element |
|---|---|
| 邀请事由 reason | `reasonCode` or `reasonReference` |
| 目的 purpose (the question to answer) | `code` (coding or text) |
| 时间安排 proposed time | `occurrenceDateTime`, `occurrencePeriod` or `occurrenceTiming` |
| 病历摘要 record summary | `supportingInfo` → DocumentReference or Composition |
| 拟邀请医师的专业 specialty wanted | `performerType` (…/CodeSystem/specialty) |
| 技术职务任职资格 title wanted (at least) | `orderDetail` (…/CodeSystem/professional-title) |
| 知情同意 written consent | `supportingInfo` → Consent (held by the platform) |
| what is to be read (remote diagnosis) | `supportingInfo` → ImagingStudy / Observation / … |
"""

from typing import Any

from fhirkit.errors import BusinessRuleViolation
from fhirkit.search.values import date_range
from fhirkit.store.hooks import WriteContext
from fhirkit.workflow.machine import reference_of
from servicekit.consent import opting_out_patient
from servicekit.tiers import organization_of, place, same_alliance
from telemedicine.vocabulary import (
    CATEGORY_SYSTEM,
    SPECIALTY_SYSTEM,
    TASK_CODE_OF_CATEGORY,
    TITLE_GRADE,
    TITLE_SYSTEM,
    category_of,
    codes,
)

SUMMARY_TYPES = ("DocumentReference", "Composition")
# What a remote reader needs to see, per category (the shared results in results sharing).
MATERIAL_TYPES = {
    "remote-imaging": ("ImagingStudy",),
    "remote-ecg": ("Observation", "DocumentReference", "Media"),
    "remote-pathology": ("Specimen", "ImagingStudy", "Media", "DiagnosticReport"),
}
INACTIVE = ("revoked", "entered-in-error", "completed")


class TelemedicineRequestHooks:
    async def before_write(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        if resource is None or resource.get("status") in INACTIVE:
            return  # withdrawing or closing an invitation needs no content
        category = category_of(resource)
        if category not in TASK_CODE_OF_CATEGORY:
            raise BusinessRuleViolation(
                f"A telemedicine request has a category from {CATEGORY_SYSTEM}: "
                f"{', '.join(TASK_CODE_OF_CATEGORY)}",
                expression=["ServiceRequest.category"],
            )
        require_content(resource, category)
        await check_consent(repo, resource, repo.config.clock())
        await check_invited_parties(repo.config.references, resource)

    async def after_write(self, repo: Any, resource: dict[str, Any] | None, context: WriteContext) -> None:
        return None


def supporting(request: dict[str, Any], types: tuple[str, ...]) -> list[str]:
    found = [reference_of(item) or "" for item in request.get("supportingInfo") or []]
    return [r for r in found if r.split("/", 1)[0] in types or _absolute_of_type(r, types)]


def _absolute_of_type(reference: str, types: tuple[str, ...]) -> bool:
    # Results held outside the alliance are referenced by absolute URL (…/ImagingStudy/123).
    parts = reference.rstrip("/").split("/")
    return reference.startswith(("http://", "https://")) and len(parts) >= 2 and parts[-2] in types


def require_content(request: dict[str, Any], category: str) -> None:
    checks = [
        ("subject (the Patient)", str((request.get("subject") or {}).get("reference", "")).startswith("Patient/"),
         "ServiceRequest.subject"),
        ("requester (the inviting party)", bool(request.get("requester")), "ServiceRequest.requester"),
        ("performer (the invited Organization)", bool(_invited_organizations(request)), "ServiceRequest.performer"),
        ("reason (reasonCode or reasonReference)", bool(request.get("reasonCode") or request.get("reasonReference")),
         "ServiceRequest.reasonCode"),
        ("purpose (code)", _has_concept(request.get("code")), "ServiceRequest.code"),
        ("proposed time (occurrence[x])", any(request.get(k) for k in
                                              ("occurrenceDateTime", "occurrencePeriod", "occurrenceTiming")),
         "ServiceRequest.occurrence"),
        ("record summary (supportingInfo → DocumentReference or Composition)", bool(supporting(request, SUMMARY_TYPES)),
         "ServiceRequest.supportingInfo"),
        (f"specialty wanted (performerType from {SPECIALTY_SYSTEM})", bool(wanted_specialties(request)),
         "ServiceRequest.performerType"),
        (f"title wanted (orderDetail from {TITLE_SYSTEM})", wanted_grade(request) is not None,
         "ServiceRequest.orderDetail"),
        ("the patient's consent (supportingInfo → Consent)", bool(supporting(request, ("Consent",))),
         "ServiceRequest.supportingInfo"),
    ]
    if category in MATERIAL_TYPES:
        types = MATERIAL_TYPES[category]
        checks.append((f"what is to be read (supportingInfo → {' or '.join(types)})", bool(supporting(request, types)),
                       "ServiceRequest.supportingInfo"))
    missing = [(name, path) for name, present, path in checks if not present]
    if missing:
        raise BusinessRuleViolation(
            f"A {category} invitation needs: {'; '.join(name for name, _ in missing)}",
            expression=list(dict.fromkeys(path for _, path in missing)),
        )


def _has_concept(concept: Any) -> bool:
    return isinstance(concept, dict) and bool(concept.get("text") or concept.get("coding"))


def _invited_organizations(request: dict[str, Any]) -> list[str]:
    return [r for r in (reference_of(p) for p in request.get("performer") or []) if r and r.startswith("Organization/")]


def invited_organizations(request: dict[str, Any]) -> list[str]:
    return _invited_organizations(request)


def wanted_specialties(request: dict[str, Any]) -> list[str]:
    return codes(request.get("performerType"), SPECIALTY_SYSTEM)


def wanted_grade(request: dict[str, Any]) -> int | None:
    grades = [TITLE_GRADE[c] for c in codes(request.get("orderDetail"), TITLE_SYSTEM) if c in TITLE_GRADE]
    return min(grades) if grades else None


async def check_consent(repo: Any, request: dict[str, Any], now_micros: int) -> None:
    """The referenced Consent (held by the platform) must be active, the patient's, in force now,
    a permit, and given to the inviting organization when it names one."""
    await _refuse_opted_out(repo, reference_of(request.get("subject")) or "")
    reference = supporting(request, ("Consent",))[0]
    if not reference.startswith("Consent/"):
        raise BusinessRuleViolation("The consent is a Consent held by the alliance platform (Consent/id)",
                                    expression=["ServiceRequest.supportingInfo"])
    consent = await repo.config.references.read("Consent", reference.split("/", 1)[1], fresh=True)
    if consent is None:
        raise BusinessRuleViolation(f"{reference} does not exist", expression=["ServiceRequest.supportingInfo"])
    problem = _consent_problem(consent, request, now_micros)
    if problem is None:
        requester = reference_of(request.get("requester")) or ""
        organization = await organization_of(repo.config.references, requester, "ServiceRequest.requester")
        given_to = [reference_of(o) for o in consent.get("organization") or []]
        if given_to and organization not in given_to:
            problem = f"it was given to {', '.join(map(str, given_to))}, not to the inviting {organization}"
    if problem:
        raise BusinessRuleViolation(f"{reference} is no active consent for this request: {problem}",
                                    expression=["ServiceRequest.supportingInfo"])


async def _refuse_opted_out(repo: Any, patient: str) -> None:
    """Asked of the platform at each invitation, never from a copy: an opt-out written a moment ago
    already stops the next invitation."""
    consents = await repo.config.references.search("Consent", [("patient", patient), ("status", "active")])
    for consent in consents:
        if opting_out_patient(consent) is not None:
            raise BusinessRuleViolation(
                f"The patient opted out of the alliance's sharing (Consent/{consent.get('id')}): their records "
                "cannot be sent for a teleconsultation", expression=["ServiceRequest.subject"])


def _consent_problem(consent: dict[str, Any], request: dict[str, Any], now_micros: int) -> str | None:
    if consent.get("status") != "active":
        return f"its status is '{consent.get('status')}'"
    if reference_of(consent.get("patient")) != reference_of(request.get("subject")):
        return f"it is the consent of {reference_of(consent.get('patient'))}, not of the request's subject"
    provision = consent.get("provision") or {}
    if provision.get("type") == "deny":
        return "its provision denies"
    period = provision.get("period") or {}
    start = date_range(period["start"]) if isinstance(period.get("start"), str) else None
    end = date_range(period["end"]) if isinstance(period.get("end"), str) else None
    if (start and now_micros < start[0]) or (end and now_micros > end[1]):
        return "it is not in force now (provision.period)"
    return None


async def check_invited_parties(directory: Any, request: dict[str, Any]) -> None:
    """Invitations go up the tiers (or to a center of the same tier), inside the alliance or to an
    upper-level partner hospital of it."""
    requester = reference_of(request.get("requester")) or ""
    organization = await organization_of(directory, requester, "ServiceRequest.requester")
    if organization is None:
        raise BusinessRuleViolation("The requester is the inviting Organization or a PractitionerRole at it",
                                    expression=["ServiceRequest.requester"])
    inviting = await place(directory, organization)
    for invited_reference in invited_organizations(request):
        invited = await place(directory, invited_reference)
        if invited_reference == organization:
            raise BusinessRuleViolation("An organization does not invite itself", expression=["ServiceRequest.performer"])
        if inviting.rank is not None and invited.rank is not None and invited.rank < inviting.rank:
            raise BusinessRuleViolation(
                f"Invitations go up the tiers: {invited_reference} ({invited.code}) is below the inviting "
                f"{organization} ({inviting.code})",
                expression=["ServiceRequest.performer"],
            )
        if not same_alliance(inviting, invited):
            raise BusinessRuleViolation(
                f"{invited_reference} is outside the alliance of {organization} and its partner hospitals",
                expression=["ServiceRequest.performer"],
            )

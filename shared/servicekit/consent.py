"""A patient's opt-out of sharing, from the platform's Consents to every service that shares data.

An opt-out is an active Consent whose provision denies without narrowing (no actor, data, class,
code, purpose or action): the patient refuses the alliance's sharing as a whole. Each service
that honours it keeps a copy (`fhir_access_opt_out`) from the Consent events, so its access
predicate can leave such patients out of every grant in the same SQL; a Consent made inactive,
permitting again, or deleted lifts it. Narrower denials are read where they apply (a
teleconsultation's own Consent).
"""

from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from fhirkit import jsonio
from fhirkit.access import record_opt_out
from servicekit.events import Event

NARROWING = ("actor", "data", "class", "code", "purpose", "action", "securityLabel", "dataPeriod", "provision")


def opting_out_patient(consent: dict[str, Any]) -> str | None:
    """The patient a Consent opts out of sharing as a whole, or None."""
    provision = consent.get("provision") or {}
    if consent.get("status") != "active" or provision.get("type") != "deny":
        return None
    if any(provision.get(element) for element in NARROWING):
        return None
    patient = (consent.get("patient") or {}).get("reference")
    return patient if isinstance(patient, str) and patient.startswith("Patient/") else None


async def apply_consent_event(event: Event, conn: AsyncConnection) -> None:
    if event.resource_id is None:
        return
    consent = jsonio.loads(event.payload) if event.payload else {}
    patient = opting_out_patient(consent) if event.type != "delete" else None
    await record_opt_out(conn, consent_id=event.resource_id, patient=patient, now=event.occurred_at)

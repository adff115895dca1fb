"""Who owns which resource type (ARCHITECTURE.md §1). The gateway routes by this table and
services use it to know which references they can check, and where."""

DIRECTORY_TYPES = frozenset(
    {"Patient", "Organization", "Practitioner", "PractitionerRole", "Location", "HealthcareService", "Endpoint"}
)
REFERRAL_TYPES = frozenset(
    {"ServiceRequest", "Task", "Provenance", "Condition", "Encounter", "EpisodeOfCare", "CareTeam", "CarePlan"}
)
RESULTS_SHARING_TYPES = frozenset(
    {
        "Observation", "DiagnosticReport", "ImagingStudy", "Specimen", "Media", "DocumentReference",
        "Composition", "Binary", "Bundle", "Procedure", "Device", "SupplyRequest", "SupplyDelivery",
        "DetectedIssue", "Flag", "CodeSystem", "ValueSet", "ConceptMap", "VerificationResult",
        "Task", "Provenance",
    }
)
TELEMEDICINE_TYPES = frozenset(
    {
        "ServiceRequest", "Task", "Provenance", "Appointment", "AppointmentResponse", "Schedule", "Slot",
        "Communication", "CommunicationRequest",
    }
)
PLATFORM_TYPES = frozenset({"AuditEvent", "Subscription", "SubscriptionTopic", "Consent"})

OWNED_TYPES: dict[str, frozenset[str]] = {
    "directory": DIRECTORY_TYPES,
    "referral": REFERRAL_TYPES,
    "results-sharing": RESULTS_SHARING_TYPES,
    "telemedicine": TELEMEDICINE_TYPES,
    "platform": PLATFORM_TYPES,
}

# Types several services hold; the first owner is the default (a general order is a referral's).
SHARED_TYPES = frozenset({"ServiceRequest", "Task", "Provenance"})
ID_PREFIXES = {"referral": "", "results-sharing": "rs-", "telemedicine": "tm-"}

ALL_TYPES: frozenset[str] = frozenset().union(*OWNED_TYPES.values())


def owners(resource_type: str) -> list[str]:
    """Services holding a type, default owner first."""
    found = [name for name, types in OWNED_TYPES.items() if resource_type in types]
    return sorted(found, key=lambda name: (name != "referral", name))


def owner_by_id(resource_type: str, resource_id: str) -> str | None:
    """For a shared type, the service whose id prefix the id carries (None: ask each owner)."""
    for name, prefix in ID_PREFIXES.items():
        if prefix and resource_id.startswith(prefix) and resource_type in OWNED_TYPES[name]:
            return name
    return None

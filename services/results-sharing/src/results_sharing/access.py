"""Who sees which shared results (DOMAIN.md §3 and §6, fhirkit.access).

The producing center owns what it posts and always reads it. Another organization reads a
patient's results only through a grant of scope `results`: an open or recent referral or
teleconsultation involving it (granted from those services' Task events), or a recognition
check it made for the patient. Catalogs, code systems, quality records and device records
(sterile packs and sterilizers) carry no patient data and are read by every member.
"""

from fhirkit.access import AccessPolicy
from servicekit.grants import TaskGrants

RESULTS_SCOPE = "results"

POLICY = AccessPolicy(
    public_types=frozenset({"CodeSystem", "ValueSet", "ConceptMap", "VerificationResult", "Device"}),
    parties={
        "Task": ("requester", "owner"),
        "SupplyDelivery": ("supplier", "receiver"),
        "ServiceRequest": ("requester", "performer"),
    },
    grant_scopes=frozenset({RESULTS_SCOPE}),
)

GRANTS = TaskGrants(RESULTS_SCOPE, from_services=("referral", "telemedicine"))

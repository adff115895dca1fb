"""Who sees which telemedicine records: the declaration the shared access predicate
(fhirkit.access) compiles, as referral's; no filtering of its own.

The inviting and the invited party of a request are its parties; every hop of a forwarded
invitation that shares a `requisition` is visible to the parties of any hop (the inviting party
follows it up the tiers; a forwarded hop also keeps the inviting party as its requester). A Task,
a Provenance and an Appointment are visible to whoever sees the request or Task they are about.
Schedules and Slots carry no patient data: every member reads them to find a session time.
"""

from fhirkit.access import AccessPolicy

POLICY = AccessPolicy(
    public_types=frozenset({"Schedule", "Slot"}),
    parties={
        "ServiceRequest": ("requester", "performer"),
        "Task": ("requester", "owner"),
        "Appointment": ("actor",),
        "AppointmentResponse": ("actor",),
        "Communication": ("sender", "recipient"),
        "CommunicationRequest": ("requester", "recipient"),
    },
    chains={"ServiceRequest": "requisition"},
    follows={"Task": ("focus",), "Provenance": ("target",), "Appointment": ("based-on",),
             "Communication": ("based-on",)},
)

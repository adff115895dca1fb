"""Which events a topic takes, and what its filters see in them (no delivery involved)."""

from gateway.subscriptions.criteria import SubscriptionConfig
from gateway.subscriptions.topics import concerned_topics, matching_topics
from servicekit.events import Event

TOWNSHIP, COUNTY = "Organization/thc-xikou", "Organization/qingxi-county-hospital"
APPOINTMENT = {
    "resourceType": "Appointment", "id": "a1", "status": "booked",
    "basedOn": [{"reference": "ServiceRequest/tm-1"}],
    "participant": [{"actor": {"reference": TOWNSHIP}, "status": "accepted"},
                    {"actor": {"reference": COUNTY}, "status": "accepted"},
                    {"actor": {"reference": "Patient/p1"}, "status": "accepted"}],
}


def event(service: str, resource_type: str, interaction: str) -> Event:
    return Event(id="e1", seq=1, service=service, kind="resource", type=interaction, occurred_at=1,
                 resource_type=resource_type, resource_id="a1", version_id=1)


def config(**filters: list[str]) -> SubscriptionConfig:
    return SubscriptionConfig("http://county-alliance.org/fhir/SubscriptionTopic/teleconsult-status", filters,
                              "http://127.0.0.1:9/hook", "id-only", "application/fhir+json", None, 10.0, 20, [])


def test_a_booked_or_cancelled_session_is_a_teleconsult_status_change_for_both_parties() -> None:
    for interaction in ("create", "update"):
        codes = [t.code for t in matching_topics(event("telemedicine", "Appointment", interaction), APPOINTMENT)]
        assert codes == ["teleconsult-status"]
    for party in (TOWNSHIP, COUNTY):
        assert config(owner=[party]).accepts(APPOINTMENT)
    assert config(owner=["Organization/thc-shimen"]).accepts(APPOINTMENT) is False
    assert config(status=["cancelled"]).accepts(APPOINTMENT) is False
    assert config(patient=["Patient/p1"], status=["booked"]).accepts(APPOINTMENT)


def test_an_appointment_of_no_request_or_of_another_service_is_no_teleconsultation() -> None:
    unrelated = {k: v for k, v in APPOINTMENT.items() if k != "basedOn"}
    assert matching_topics(event("telemedicine", "Appointment", "create"), unrelated) == []
    assert matching_topics(event("referral", "Appointment", "create"), APPOINTMENT) == []


def test_the_topics_an_event_concerns_are_known_before_its_resource_is_read() -> None:
    # The hub asks who collects for these before it parses the event's bytes.
    assert [t.code for t in concerned_topics(event("telemedicine", "Appointment", "create"))] == ["teleconsult-status"]
    assert concerned_topics(event("referral", "Appointment", "create")) == []
    assert concerned_topics(event("telemedicine", "Appointment", "delete")) == []
    # Concerned is necessary, not sufficient: the resource still decides.
    unrelated = {k: v for k, v in APPOINTMENT.items() if k != "basedOn"}
    assert not any(t.matches(event("telemedicine", "Appointment", "create"), unrelated)
                   for t in concerned_topics(event("telemedicine", "Appointment", "create")))

"""Which Consents are a patient's opt-out of sharing as a whole."""

import pytest

from servicekit.consent import opting_out_patient

OPT_OUT = {"resourceType": "Consent", "status": "active", "patient": {"reference": "Patient/p1"},
           "provision": {"type": "deny"}}


def test_an_active_unconditional_denial_opts_the_patient_out() -> None:
    assert opting_out_patient(OPT_OUT) == "Patient/p1"


@pytest.mark.parametrize("change", [
    {"status": "inactive"},
    {"status": "proposed"},
    {"provision": {"type": "permit"}},
    {"provision": {"type": "deny", "class": [{"code": "ImagingStudy"}]}},
    {"provision": {"type": "deny", "actor": [{"reference": {"reference": "Organization/x"}}]}},
    {"provision": {"type": "deny", "provision": [{"type": "permit"}]}},
    {"patient": {"reference": "Group/g1"}},
    {"provision": None},
])
def test_anything_narrower_or_not_in_force_is_not(change: dict) -> None:
    assert opting_out_patient({**OPT_OUT, **change}) is None

import pytest

from gateway.auth.scopes import InvalidScope, Scope, ScopeSet

# (scope text, resource type, interaction, permitted)
PERMITS_TABLE = [
    # v1
    ("system/Patient.read", "Patient", "r", True),
    ("system/Patient.read", "Patient", "s", True),
    ("system/Patient.read", "Patient", "c", False),
    ("system/Patient.read", "Patient", "u", False),
    ("system/Patient.read", "Observation", "r", False),
    ("system/Patient.write", "Patient", "c", True),
    ("system/Patient.write", "Patient", "u", True),
    ("system/Patient.write", "Patient", "d", True),
    ("system/Patient.write", "Patient", "r", False),
    ("system/Patient.write", "Patient", "s", False),
    ("system/Patient.*", "Patient", "d", True),
    ("system/*.read", "Observation", "s", True),
    ("system/*.read", "Observation", "u", False),
    ("system/*.*", "Task", "c", True),
    ("user/*.write", "Task", "u", True),
    # v2
    ("system/Patient.rs", "Patient", "r", True),
    ("system/Patient.rs", "Patient", "s", True),
    ("system/Patient.rs", "Patient", "c", False),
    ("system/Patient.rs", "Encounter", "r", False),
    ("system/Task.cru", "Task", "c", True),
    ("system/Task.cru", "Task", "u", True),
    ("system/Task.cru", "Task", "d", False),
    ("system/Task.cru", "Task", "s", False),
    ("system/*.cruds", "ServiceRequest", "d", True),
    ("system/*.s", "Observation", "s", True),
    ("system/*.s", "Observation", "r", False),
    ("user/Observation.d", "Observation", "d", True),
    # restricted and patient-context scopes grant nothing until narrowing/compartments are applied
    ("system/Observation.rs?category=laboratory", "Observation", "s", False),
    ("patient/Observation.rs", "Observation", "r", False),
    ("patient/*.read", "Observation", "r", False),
    # non-resource scopes grant nothing
    ("openid fhirUser offline_access", "Patient", "r", False),
]


@pytest.mark.parametrize(("text", "resource_type", "interaction", "expected"), PERMITS_TABLE)
def test_permits_table(text: str, resource_type: str, interaction: str, expected: bool) -> None:
    assert ScopeSet.parse(text).permits(resource_type, interaction) is expected


def test_patient_scopes_count_only_when_caller_applies_the_compartment() -> None:
    scopes = ScopeSet.parse("patient/Observation.rs")
    assert scopes.permits("Observation", "r", contexts=("patient",))


def test_restrictions_report_the_queries_to_narrow_by() -> None:
    scopes = ScopeSet.parse(
        "system/Observation.rs?category=laboratory system/Observation.s?category=vital-signs"
    )
    assert scopes.restrictions("Observation", "s") == ("category=laboratory", "category=vital-signs")
    assert scopes.restrictions("Observation", "r") == ("category=laboratory",)
    assert scopes.restrictions("Observation", "c") is None
    assert ScopeSet.parse("system/*.rs").restrictions("Observation", "s") == ()
    # An unrestricted scope wins over a restricted one.
    both = ScopeSet.parse("system/Observation.s?category=laboratory system/*.s")
    assert both.restrictions("Observation", "s") == ()


@pytest.mark.parametrize(
    "text",
    [
        "system/Patient.sr",  # out of order
        "system/Patient.rr",
        "system/Patient.",
        "system/Patient.x",
        "system/patient.rs",  # types are capitalised
        "admin/Patient.rs",
        "system/Patient.read?x=1",  # v1 takes no query
        "system/Patient.rs?",
        "system/Patient.rs?name",
        "Patient.rs",
    ],
)
def test_garbage_is_refused(text: str) -> None:
    with pytest.raises(InvalidScope):
        Scope.parse(text)
    with pytest.raises(InvalidScope):
        ScopeSet.parse(text, strict=True)
    assert not ScopeSet.parse(text)


def test_rendering_keeps_the_callers_spelling() -> None:
    text = "system/Patient.read user/*.write patient/Observation.rs?category=laboratory openid"
    assert str(ScopeSet.parse(text)) == text


@pytest.mark.parametrize(
    ("registered", "requested", "granted"),
    [
        ("system/Patient.rs", "system/*.cruds", "system/Patient.rs"),
        ("system/*.cruds", "system/Patient.rs", "system/Patient.rs"),
        ("system/*.rs", "system/Patient.read", "system/Patient.read"),
        ("system/*.rs", "system/Patient.*", "system/Patient.read"),  # v1 asked, v1 answered
        ("system/*.cruds", "system/*.write", "system/*.write"),
        ("system/Patient.rs system/Task.cru", "system/*.cruds", "system/Patient.rs system/Task.cru"),
        ("system/Task.cruds", "system/Task.cud junk system/Patient.r", "system/Task.cud"),
        (
            "system/Observation.rs?category=laboratory",
            "system/*.rs",
            "system/Observation.rs?category=laboratory",
        ),
        (
            "system/Observation.rs?category=laboratory",
            "system/Observation.s?code=1234-5",
            "system/Observation.s?code=1234-5&category=laboratory",
        ),
        ("system/*.rs openid", "system/*.rs openid fhirUser", "system/*.rs openid"),
        ("user/*.rs system/*.rs", "user/Patient.rs", "user/Patient.rs"),
    ],
)
def test_narrow_is_the_intersection(registered: str, requested: str, granted: str) -> None:
    assert str(ScopeSet.parse(registered).narrow(requested)) == granted


@pytest.mark.parametrize(
    ("registered", "requested"),
    [
        ("system/Patient.rs", "system/Patient.cud"),
        ("system/Patient.rs", "system/Observation.rs"),
        ("system/Patient.rs", "patient/Patient.rs"),  # contexts never mix
        ("system/Patient.rs", "junk"),
        ("system/Patient.rs", ""),
        ("system/Patient.rs openid", "openid"),  # non-resource scopes alone are not a grant
    ],
)
def test_narrow_to_nothing_is_invalid_scope(registered: str, requested: str) -> None:
    with pytest.raises(InvalidScope):
        ScopeSet.parse(registered).narrow(requested)


def test_narrowed_set_permits_only_the_intersection() -> None:
    narrowed = ScopeSet.parse("system/Patient.rs system/Task.cruds").narrow("system/*.cr")
    assert narrowed.permits("Patient", "r")
    assert not narrowed.permits("Patient", "s")
    assert narrowed.permits("Task", "c")
    assert not narrowed.permits("Task", "u")

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from fhirkit.patch import PatchError, apply_fhirpath_patch, apply_json_patch, apply_merge_patch

EXAMPLES = Path(__file__).resolve().parents[4] / "shared" / "fhir-r4-examples"
BIRTH_TIME = "http://hl7.org/fhir/StructureDefinition/patient-birthTime"
OWN_PREFIX = "http://hl7.org/fhir/StructureDefinition/humanname-own-prefix"
CN_ID_SYSTEM = "urn:oid:2.16.156.10011.1.3"


def load_example(name: str) -> dict[str, Any]:
    path = EXAMPLES / name
    if not path.exists():
        pytest.skip(f"HL7 example {name} is not available")
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture
def patient() -> dict[str, Any]:
    return load_example("patient-example.json")


@pytest.fixture
def blood_pressure() -> dict[str, Any]:
    return load_example("observation-example-bloodpressure-dar.json")


@pytest.fixture
def chinese_patient() -> dict[str, Any]:
    resource = load_example("patient-example-chinese.json")
    resource["identifier"].append({"system": CN_ID_SYSTEM, "value": "110101199003074518"})
    return resource


def assert_clean(value: Any, where: str = "$") -> None:
    """FHIR JSON has no {}, [] or null (except nulls that align value and `_value` arrays)."""
    assert value is not None, f"null at {where}"
    if isinstance(value, dict):
        assert value, f"empty object at {where}"
        for key, member in value.items():
            aligned = isinstance(member, list) and (
                ("_" + key) in value or (key.startswith("_") and key[1:] in value)
            )
            if aligned:
                assert any(item is not None for item in member), f"all-null array at {where}.{key}"
                for position, item in enumerate(member):
                    if item is not None:
                        assert_clean(item, f"{where}.{key}[{position}]")
            else:
                assert_clean(member, f"{where}.{key}")
    elif isinstance(value, list):
        assert value, f"empty array at {where}"
        for position, item in enumerate(value):
            assert_clean(item, f"{where}[{position}]")


# ---------------------------------------------------------------------------------------------------
# FHIRPath Patch helpers
# ---------------------------------------------------------------------------------------------------

INTEGER_PARTS = ("index", "source", "destination")


def operation(
    kind: str, path: str, *, name: str | None = None, value: dict | None = None, **integers: int
) -> dict:
    parts: list[dict[str, Any]] = [{"name": "type", "valueCode": kind}, {"name": "path", "valueString": path}]
    if name is not None:
        parts.append({"name": "name", "valueString": name})
    if value is not None:
        parts.append({"name": "value", **value})
    for part_name in INTEGER_PARTS:
        if part_name in integers:
            parts.append({"name": part_name, "valueInteger": integers[part_name]})
    return {"name": "operation", "part": parts}


def parameters(*operations: dict) -> dict:
    return {"resourceType": "Parameters", "parameter": list(operations)}


def fhirpath_patch(resource: dict, *operations: dict) -> dict:
    result = apply_fhirpath_patch(resource, parameters(*operations))
    assert_clean(result)
    return result


def fhirpath_error(resource: dict, *operations: dict) -> PatchError:
    with pytest.raises(PatchError) as caught:
        apply_fhirpath_patch(resource, parameters(*operations))
    return caught.value


def example_ids(*numbers: int) -> list[dict[str, str]]:
    return [{"system": "http://example.org", "value": f"value {n}"} for n in numbers]


def with_ids(*numbers: int) -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": example_ids(*numbers)}


# ---------------------------------------------------------------------------------------------------
# FHIRPath Patch: the HL7 fhir-test-cases (r4/patch/fhir-patch-tests.xml), transcribed to JSON
# ---------------------------------------------------------------------------------------------------

CONTACT = {"name": {"text": "a name"}, "gender": "male"}

OFFICIAL_CASES = [
    (
        "No Difference",
        {"resourceType": "Patient", "birthDate": "1920-01-01"},
        [],
        {"resourceType": "Patient", "birthDate": "1920-01-01"},
    ),
    (
        "Replace Primitive",
        {"resourceType": "Patient", "birthDate": "1920-01-01"},
        [operation("replace", "Patient.birthDate", value={"valueDate": "1930-01-01"})],
        {"resourceType": "Patient", "birthDate": "1930-01-01"},
    ),
    (
        "Delete Primitive",
        {"resourceType": "Patient", "birthDate": "1920-01-01"},
        [operation("delete", "Patient.birthDate")],
        {"resourceType": "Patient"},
    ),
    (
        "Add Primitive",
        {"resourceType": "Patient"},
        [operation("add", "Patient", name="birthDate", value={"valueDate": "1930-01-01"})],
        {"resourceType": "Patient", "birthDate": "1930-01-01"},
    ),
    (
        "Replace Nested Primitive #1",
        {"resourceType": "Patient", "contact": [CONTACT]},
        [operation("replace", "Patient.contact[0].gender", value={"valueCode": "female"})],
        {"resourceType": "Patient", "contact": [{"name": {"text": "a name"}, "gender": "female"}]},
    ),
    (
        "Replace Nested Primitive #2",
        {"resourceType": "Patient", "contact": [CONTACT]},
        [operation("replace", "Patient.contact[0].name.text", value={"valueString": "the name"})],
        {"resourceType": "Patient", "contact": [{"name": {"text": "the name"}, "gender": "male"}]},
    ),
    (
        "Delete Nested Primitive #1",
        {"resourceType": "Patient", "contact": [CONTACT]},
        [operation("delete", "Patient.contact[0].gender")],
        {"resourceType": "Patient", "contact": [{"name": {"text": "a name"}}]},
    ),
    (
        "Delete Nested Primitive #2",
        {"resourceType": "Patient", "contact": [CONTACT]},
        [operation("delete", "Patient.contact[0].name.text")],
        {"resourceType": "Patient", "contact": [{"gender": "male"}]},
    ),
    (
        "Add Nested Primitive",
        {"resourceType": "Patient", "contact": [{"name": {"text": "a name"}}]},
        [operation("add", "Patient.contact[0]", name="gender", value={"valueCode": "male"})],
        {"resourceType": "Patient", "contact": [CONTACT]},
    ),
    (
        "Add Complex",
        {"resourceType": "Patient"},
        [
            operation(
                "add", "Patient", name="maritalStatus", value={"valueCodeableConcept": {"text": "married"}}
            )
        ],
        {"resourceType": "Patient", "maritalStatus": {"text": "married"}},
    ),
    (
        "Replace Complex",
        {"resourceType": "Patient", "maritalStatus": {"id": "1", "text": "married"}},
        [
            operation(
                "replace",
                "Patient.maritalStatus",
                value={"valueCodeableConcept": {"id": "2", "text": "not married"}},
            )
        ],
        {"resourceType": "Patient", "maritalStatus": {"id": "2", "text": "not married"}},
    ),
    (
        "Delete Complex",
        {"resourceType": "Patient", "maritalStatus": {"text": "married"}},
        [operation("delete", "Patient.maritalStatus")],
        {"resourceType": "Patient"},
    ),
    (
        "Add Anonymous Type",
        {"resourceType": "Patient"},
        [
            operation(
                "add",
                "Patient",
                name="contact",
                value={"part": [{"name": "name", "valueHumanName": {"text": "a name"}}]},
            )
        ],
        {"resourceType": "Patient", "contact": [{"name": {"text": "a name"}}]},
    ),
    (
        "Delete Anonymous Type",
        {"resourceType": "Patient", "contact": [{"name": {"text": "a name"}}]},
        [operation("delete", "Patient.contact[0]")],
        {"resourceType": "Patient"},
    ),
    (
        "List unchanged, contents changed",
        {
            "resourceType": "Patient",
            "identifier": [{"id": "a", **example_ids(1)[0]}, {"id": "b", **example_ids(2)[0]}],
        },
        [
            operation("replace", "Patient.identifier[0].value", value={"valueString": "value 2"}),
            operation("replace", "Patient.identifier[1].value", value={"valueString": "value 1"}),
        ],
        {
            "resourceType": "Patient",
            "identifier": [{"id": "a", **example_ids(2)[0]}, {"id": "b", **example_ids(1)[0]}],
        },
    ),
    (
        "Add to list",
        with_ids(1, 2),
        [operation("add", "Patient", name="identifier", value={"valueIdentifier": example_ids(3)[0]})],
        with_ids(1, 2, 3),
    ),
    (
        "Insert in list #1",
        with_ids(1, 2),
        [operation("insert", "Patient.identifier", index=1, value={"valueIdentifier": example_ids(3)[0]})],
        with_ids(1, 3, 2),
    ),
    (
        "Insert in list #2",
        with_ids(1, 2),
        [operation("insert", "Patient.identifier", index=0, value={"valueIdentifier": example_ids(3)[0]})],
        with_ids(3, 1, 2),
    ),
    (
        "Delete from List #1",
        with_ids(1, 2, 3),
        [operation("delete", "Patient.identifier[0]")],
        with_ids(2, 3),
    ),
    (
        "Delete from List #2",
        with_ids(1, 2, 3),
        [operation("delete", "Patient.identifier[1]")],
        with_ids(1, 3),
    ),
    (
        "Delete from List #3",
        with_ids(1, 2, 3),
        [operation("delete", "Patient.identifier[2]")],
        with_ids(1, 2),
    ),
    (
        "Reorder List #1",
        with_ids(1, 2, 3, 4),
        [operation("move", "Patient.identifier", source=3, destination=1)],
        with_ids(1, 4, 2, 3),
    ),
    (
        "Reorder List #2",
        with_ids(1, 2, 3, 4),
        [operation("move", "Patient.identifier", source=3, destination=0)],
        with_ids(4, 1, 2, 3),
    ),
    (
        "Reorder List #3",
        with_ids(1, 2, 3, 4),
        [operation("move", "Patient.identifier", source=3, destination=2)],
        with_ids(1, 2, 4, 3),
    ),
    (
        "Reorder List #4",
        with_ids(1, 2, 3, 4),
        [operation("move", "Patient.identifier", source=0, destination=3)],
        with_ids(2, 3, 4, 1),
    ),
    (
        "Reorder List #5",
        with_ids(1, 2, 3, 4),
        [
            operation("move", "Patient.identifier", source=1, destination=0),
            operation("move", "Patient.identifier", source=2, destination=1),
        ],
        with_ids(2, 3, 1, 4),
    ),
    (
        "Reorder List #6",
        with_ids(1, 2, 3, 4),
        [
            operation("move", "Patient.identifier", source=3, destination=0),
            operation("move", "Patient.identifier", source=3, destination=1),
            operation("move", "Patient.identifier", source=3, destination=2),
        ],
        with_ids(4, 3, 2, 1),
    ),
    (
        "Operation on missing element #2",
        {"resourceType": "Patient"},
        [operation("add", "Patient", name="identifier", value={"valueIdentifier": example_ids(3)[0]})],
        with_ids(3),
    ),
    (
        "Consecutive operations",
        {
            "resourceType": "Patient",
            "id": "example",
            "contact": [
                {
                    "name": {
                        "family": "du Marché",
                        "_family": {"extension": [{"url": OWN_PREFIX, "valueString": "WW"}]},
                        "given": ["Bénédicte"],
                    }
                }
            ],
        },
        [
            operation("add", "Patient.contact[0]", name="gender", value={"valueCode": "male"}),
            operation(
                "add", "Patient", name="contact", value={"part": [{"name": "gender", "valueCode": "male"}]}
            ),
        ],
        {
            "resourceType": "Patient",
            "id": "example",
            "contact": [
                {
                    "name": {
                        "family": "du Marché",
                        "_family": {"extension": [{"url": OWN_PREFIX, "valueString": "WW"}]},
                        "given": ["Bénédicte"],
                    },
                    "gender": "male",
                },
                {"gender": "male"},
            ],
        },
    ),
]


@pytest.mark.parametrize(
    ("source", "operations", "expected"),
    [case[1:] for case in OFFICIAL_CASES],
    ids=[case[0] for case in OFFICIAL_CASES],
)
def test_official_fhirpath_patch_cases(source: dict, operations: list[dict], expected: dict) -> None:
    assert fhirpath_patch(source, *operations) == expected


def test_official_operation_on_missing_element_is_an_error() -> None:
    source = {"resourceType": "Patient", "identifier": [{"use": "official", "value": "123"}]}
    error = fhirpath_error(
        source,
        operation(
            "add",
            "Patient.identifier.where(use = 'official').period",
            name="end",
            value={"valueDate": "2021-12-01"},
        ),
    )
    assert error.status_code == 422
    assert "no element" in str(error)


def test_official_full_resource_replaces_family_of_first_name(patient: dict) -> None:
    result = fhirpath_patch(
        patient, operation("replace", "Patient.name[0].family", value={"valueString": "Chalmers1"})
    )
    assert result["name"][0]["family"] == "Chalmers1"
    assert result["name"][1:] == patient["name"][1:]


# ---------------------------------------------------------------------------------------------------
# FHIRPath Patch: add
# ---------------------------------------------------------------------------------------------------


def test_add_appends_to_a_repeating_element(patient: dict) -> None:
    result = fhirpath_patch(
        patient,
        operation(
            "add",
            "Patient",
            name="telecom",
            value={"valueContactPoint": {"system": "email", "value": "jim@example.org"}},
        ),
    )
    assert result["telecom"][-1] == {"system": "email", "value": "jim@example.org"}
    assert result["telecom"][:-1] == patient["telecom"]


def test_add_writes_choice_values_under_their_typed_key(blood_pressure: dict) -> None:
    result = fhirpath_patch(
        blood_pressure,
        operation(
            "add",
            "Observation.component.where(code.coding.code='8462-4')",
            name="value",
            value={
                "valueQuantity": {
                    "value": 80,
                    "unit": "mmHg",
                    "system": "http://unitsofmeasure.org",
                    "code": "mm[Hg]",
                }
            },
        ),
    )
    diastolic = result["component"][1]
    assert diastolic["valueQuantity"]["value"] == 80
    assert "value" not in diastolic


def test_add_a_choice_element_of_a_resource() -> None:
    source = {"resourceType": "Observation", "status": "final", "code": {"text": "note"}}
    result = fhirpath_patch(
        source, operation("add", "Observation", name="value", value={"valueString": "done"})
    )
    assert result["valueString"] == "done"


def test_add_an_extension_to_a_primitive_creates_its_shadow_key() -> None:
    source = {"resourceType": "Patient", "birthDate": "1974-12-25"}
    extension = {"url": BIRTH_TIME, "valueDateTime": "1974-12-25T14:35:45-05:00"}
    result = fhirpath_patch(
        source,
        operation(
            "add",
            "Patient.birthDate",
            name="extension",
            value={
                "part": [
                    {"name": "url", "valueUri": BIRTH_TIME},
                    {"name": "value", "valueDateTime": "1974-12-25T14:35:45-05:00"},
                ]
            },
        ),
    )
    assert result == {
        "resourceType": "Patient",
        "birthDate": "1974-12-25",
        "_birthDate": {"extension": [extension]},
    }


def test_add_an_extension_built_from_parts_to_the_resource(patient: dict) -> None:
    url = "http://example.org/fhir/StructureDefinition/household-register"
    result = fhirpath_patch(
        patient,
        operation(
            "add",
            "Patient",
            name="extension",
            value={"part": [{"name": "url", "valueUri": url}, {"name": "value", "valueString": "上海市"}]},
        ),
    )
    assert result["extension"] == [{"url": url, "valueString": "上海市"}]


def test_add_an_anonymous_component_with_a_choice_value(blood_pressure: dict) -> None:
    result = fhirpath_patch(
        blood_pressure,
        operation(
            "add",
            "Observation",
            name="component",
            value={
                "part": [
                    {
                        "name": "code",
                        "valueCodeableConcept": {
                            "coding": [{"system": "http://loinc.org", "code": "8867-4"}]
                        },
                    },
                    {"name": "value", "valueQuantity": {"value": 72, "unit": "/min"}},
                ]
            },
        ),
    )
    assert result["component"][-1] == {
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "valueQuantity": {"value": 72, "unit": "/min"},
    }


def test_add_a_contained_resource() -> None:
    organization = {"resourceType": "Organization", "id": "org1", "name": "县人民医院"}
    result = fhirpath_patch(
        {"resourceType": "Patient"},
        operation("add", "Patient", name="contained", value={"resource": organization}),
    )
    assert result["contained"] == [organization]


def test_add_to_a_non_repeating_element_that_exists_is_an_error(patient: dict) -> None:
    error = fhirpath_error(patient, operation("add", "Patient", name="gender", value={"valueCode": "female"}))
    assert "use replace" in str(error)


def test_add_a_second_choice_type_is_an_error(patient: dict) -> None:
    error = fhirpath_error(
        patient, operation("add", "Patient", name="deceased", value={"valueDateTime": "2020-01-01"})
    )
    assert "already has a value" in str(error)


def test_add_to_a_path_matching_several_elements_is_an_error(patient: dict) -> None:
    error = fhirpath_error(
        patient, operation("add", "Patient.name", name="prefix", value={"valueString": "Mr"})
    )
    assert "3 elements" in str(error)
    assert error.status_code == 422


def test_add_without_name_is_malformed(patient: dict) -> None:
    error = fhirpath_error(patient, operation("add", "Patient", value={"valueCode": "female"}))
    assert error.status_code == 400
    assert "'name'" in str(error)


def test_add_without_value_is_malformed(patient: dict) -> None:
    error = fhirpath_error(patient, operation("add", "Patient", name="gender"))
    assert error.status_code == 400


def test_add_an_empty_value_part_is_malformed(patient: dict) -> None:
    error = fhirpath_error(patient, operation("add", "Patient", name="maritalStatus", value={}))
    assert error.status_code == 400
    assert "value is missing" in str(error)


def test_add_an_unknown_element_is_an_error(patient: dict) -> None:
    error = fhirpath_error(patient, operation("add", "Patient", name="shoeSize", value={"valueInteger": 42}))
    assert "not an element of Patient" in str(error)


def test_add_choice_element_from_parts_is_malformed() -> None:
    error = fhirpath_error(
        {"resourceType": "Observation"},
        operation("add", "Observation", name="value", value={"part": [{"name": "value", "valueDecimal": 1}]}),
    )
    assert error.status_code == 400
    assert "choice element" in str(error)


def test_add_choice_of_a_disallowed_type_is_an_error() -> None:
    error = fhirpath_error(
        {"resourceType": "Patient"},
        operation("add", "Patient", name="deceased", value={"valueHumanName": {"text": "x"}}),
    )
    assert "HumanName is not an allowed type" in str(error)


def test_add_a_complex_value_to_a_primitive_element_is_an_error() -> None:
    error = fhirpath_error(
        {"resourceType": "Patient"},
        operation("add", "Patient", name="gender", value={"valueCodeableConcept": {"text": "male"}}),
    )
    assert "primitive" in str(error)


def test_add_a_primitive_value_to_a_complex_element_is_an_error() -> None:
    error = fhirpath_error(
        {"resourceType": "Patient"},
        operation("add", "Patient", name="maritalStatus", value={"valueString": "married"}),
    )
    assert "complex value" in str(error)


# ---------------------------------------------------------------------------------------------------
# FHIRPath Patch: insert and move
# ---------------------------------------------------------------------------------------------------


def test_insert_at_the_end_of_a_list(patient: dict) -> None:
    result = fhirpath_patch(
        patient, operation("insert", "Patient.name", index=3, value={"valueHumanName": {"text": "Jimmy"}})
    )
    assert [name.get("text") for name in result["name"]] == [None, None, None, "Jimmy"]


def test_insert_into_an_absent_list_at_zero() -> None:
    result = fhirpath_patch(
        {"resourceType": "Patient"},
        operation("insert", "Patient.identifier", index=0, value={"valueIdentifier": {"value": "1"}}),
    )
    assert result["identifier"] == [{"value": "1"}]


def test_insert_into_a_nested_list_selected_by_where(patient: dict) -> None:
    result = fhirpath_patch(
        patient,
        operation("insert", "Patient.name.where(use='usual').given", index=0, value={"valueString": "Jimmy"}),
    )
    assert result["name"][1]["given"] == ["Jimmy", "Jim"]


def test_insert_keeps_primitive_extensions_aligned() -> None:
    source = {
        "resourceType": "Patient",
        "name": [{"given": ["Peter", "James"], "_given": [None, {"id": "j"}]}],
    }
    result = fhirpath_patch(
        source, operation("insert", "Patient.name[0].given", index=0, value={"valueString": "Jim"})
    )
    assert result["name"][0] == {"given": ["Jim", "Peter", "James"], "_given": [None, None, {"id": "j"}]}


@pytest.mark.parametrize("index", [4, 10])
def test_insert_index_past_the_end_is_an_error(patient: dict, index: int) -> None:
    error = fhirpath_error(
        patient, operation("insert", "Patient.name", index=index, value={"valueHumanName": {}})
    )
    assert "out of range" in str(error)
    assert error.status_code == 422


def test_insert_negative_index_is_malformed(patient: dict) -> None:
    error = fhirpath_error(
        patient, operation("insert", "Patient.name", index=-1, value={"valueHumanName": {"text": "x"}})
    )
    assert error.status_code == 400


def test_insert_index_must_be_an_integer(patient: dict) -> None:
    bad = operation("insert", "Patient.name", value={"valueHumanName": {"text": "x"}})
    bad["part"].append({"name": "index", "valueString": "1"})
    error = fhirpath_error(patient, bad)
    assert error.status_code == 400


def test_insert_without_index_is_malformed(patient: dict) -> None:
    error = fhirpath_error(
        patient, operation("insert", "Patient.name", value={"valueHumanName": {"text": "x"}})
    )
    assert "'index'" in str(error)


def test_insert_into_a_non_repeating_element_is_an_error(patient: dict) -> None:
    error = fhirpath_error(
        patient, operation("insert", "Patient.gender", index=0, value={"valueCode": "male"})
    )
    assert "does not repeat" in str(error)


def test_insert_path_must_end_in_an_element_name(patient: dict) -> None:
    error = fhirpath_error(
        patient, operation("insert", "Patient.name[0]", index=0, value={"valueHumanName": {"text": "x"}})
    )
    assert error.status_code == 400


def test_move_in_a_real_resource(patient: dict) -> None:
    result = fhirpath_patch(patient, operation("move", "Patient.telecom", source=2, destination=0))
    assert [telecom["use"] for telecom in result["telecom"]] == ["mobile", "home", "work", "old"]


def test_move_keeps_primitive_extensions_aligned() -> None:
    source = {
        "resourceType": "Patient",
        "name": [{"given": ["Peter", "James"], "_given": [{"id": "p"}, None]}],
    }
    result = fhirpath_patch(source, operation("move", "Patient.name[0].given", source=0, destination=1))
    assert result["name"][0] == {"given": ["James", "Peter"], "_given": [None, {"id": "p"}]}


@pytest.mark.parametrize(("source", "destination"), [(4, 0), (0, 4)])
def test_move_out_of_range_is_an_error(patient: dict, source: int, destination: int) -> None:
    error = fhirpath_error(
        patient, operation("move", "Patient.telecom", source=source, destination=destination)
    )
    assert "out of range" in str(error)


def test_move_in_an_absent_list_is_an_error(patient: dict) -> None:
    error = fhirpath_error(patient, operation("move", "Patient.photo", source=0, destination=0))
    assert "no list" in str(error)


def test_move_without_destination_is_malformed(patient: dict) -> None:
    error = fhirpath_error(patient, operation("move", "Patient.telecom", source=0))
    assert error.status_code == 400


# ---------------------------------------------------------------------------------------------------
# FHIRPath Patch: delete
# ---------------------------------------------------------------------------------------------------


def test_delete_of_nothing_is_not_an_error(patient: dict) -> None:
    assert fhirpath_patch(patient, operation("delete", "Patient.maritalStatus")) == patient
    assert fhirpath_patch(patient, operation("delete", "Patient.name[7]")) == patient
    assert fhirpath_patch(patient, operation("delete", "Patient.identifier.where(system='nope')")) == patient


def test_delete_the_last_item_removes_the_array(chinese_patient: dict) -> None:
    result = fhirpath_patch(chinese_patient, operation("delete", "Patient.name[0]"))
    assert "name" not in result


def test_delete_the_last_child_removes_the_parent(patient: dict) -> None:
    result = fhirpath_patch(patient, operation("delete", "Patient.managingOrganization.reference"))
    assert "managingOrganization" not in result


def test_delete_a_primitive_also_deletes_its_extensions(patient: dict) -> None:
    result = fhirpath_patch(patient, operation("delete", "Patient.birthDate"))
    assert "birthDate" not in result and "_birthDate" not in result


def test_delete_an_extension_of_a_primitive_keeps_the_value(patient: dict) -> None:
    result = fhirpath_patch(patient, operation("delete", f"Patient.birthDate.extension('{BIRTH_TIME}')"))
    assert result["birthDate"] == "1974-12-25"
    assert "_birthDate" not in result


def test_delete_extension_selected_with_where_on_url(patient: dict) -> None:
    result = fhirpath_patch(
        patient, operation("delete", f"Patient.contact.name.family.extension.where(url='{OWN_PREFIX}')")
    )
    assert result["contact"][0]["name"] == {"family": "du Marché", "given": ["Bénédicte"]}


def test_delete_a_repeating_primitive_keeps_extensions_aligned() -> None:
    source = {
        "resourceType": "Patient",
        "name": [{"given": ["Peter", "James"], "_given": [None, {"id": "j"}]}],
    }
    assert fhirpath_patch(source, operation("delete", "Patient.name.given[0]")) == {
        "resourceType": "Patient",
        "name": [{"given": ["James"], "_given": [{"id": "j"}]}],
    }
    assert fhirpath_patch(source, operation("delete", "Patient.name.given[1]")) == {
        "resourceType": "Patient",
        "name": [{"given": ["Peter"]}],
    }


def test_delete_matching_several_elements_is_an_error(patient: dict) -> None:
    error = fhirpath_error(patient, operation("delete", "Patient.telecom"))
    assert "4 elements" in str(error)


def test_delete_the_resource_itself_is_an_error(patient: dict) -> None:
    assert "the resource itself" in str(fhirpath_error(patient, operation("delete", "Patient")))


def test_delete_the_id_is_refused(patient: dict) -> None:
    error = fhirpath_error(patient, operation("delete", "Patient.id"))
    assert "'id'" in str(error)


def test_delete_a_component_selected_by_a_choice_value(blood_pressure: dict) -> None:
    result = fhirpath_patch(
        blood_pressure, operation("delete", "Observation.component.where(value.value > 100)")
    )
    assert [c["code"]["coding"][0]["code"] for c in result["component"]] == ["8462-4"]


# ---------------------------------------------------------------------------------------------------
# FHIRPath Patch: replace
# ---------------------------------------------------------------------------------------------------


def test_replace_an_identifier_selected_by_system(chinese_patient: dict) -> None:
    result = fhirpath_patch(
        chinese_patient,
        operation(
            "replace",
            f"Patient.identifier.where(system='{CN_ID_SYSTEM}').value",
            value={"valueString": "11010119900307451X"},
        ),
    )
    assert result["identifier"][1] == {"system": CN_ID_SYSTEM, "value": "11010119900307451X"}
    assert result["identifier"][0] == chinese_patient["identifier"][0]


def test_replace_a_whole_identifier_selected_by_system(chinese_patient: dict) -> None:
    new_identifier = {"use": "official", "system": CN_ID_SYSTEM, "value": "310101198001010011"}
    result = fhirpath_patch(
        chinese_patient,
        operation(
            "replace",
            f"Patient.identifier.where(system='{CN_ID_SYSTEM}')",
            value={"valueIdentifier": new_identifier},
        ),
    )
    assert result["identifier"][1] == new_identifier


def test_replace_a_component_value_selected_by_code(blood_pressure: dict) -> None:
    # The systolic component has three codings: where() matches if any of them has the code.
    result = fhirpath_patch(
        blood_pressure,
        operation(
            "replace",
            "Observation.component.where(code.coding.code='8480-6').value.value",
            value={"valueDecimal": 120},
        ),
    )
    assert result["component"][0]["valueQuantity"] == {
        "value": 120,
        "unit": "mmHg",
        "system": "http://unitsofmeasure.org",
        "code": "mm[Hg]",
    }


def test_replace_a_choice_value_with_another_type_renames_the_key(blood_pressure: dict) -> None:
    result = fhirpath_patch(
        blood_pressure,
        operation(
            "replace", "Observation.effective", value={"valuePeriod": {"start": "2012-09-17T08:00:00Z"}}
        ),
    )
    assert "effectiveDateTime" not in result
    assert result["effectivePeriod"] == {"start": "2012-09-17T08:00:00Z"}
    assert list(result).index("effectivePeriod") == list(blood_pressure).index("effectiveDateTime")


def test_replace_a_choice_value_of_the_same_type(patient: dict) -> None:
    result = fhirpath_patch(patient, operation("replace", "Patient.deceased", value={"valueBoolean": True}))
    assert result["deceasedBoolean"] is True


def test_replace_with_a_type_not_allowed_for_the_choice_is_an_error(patient: dict) -> None:
    error = fhirpath_error(patient, operation("replace", "Patient.deceased", value={"valueString": "yes"}))
    assert "not an allowed type" in str(error)


def test_replace_selected_with_first_and_last(patient: dict) -> None:
    result = fhirpath_patch(
        patient,
        operation("replace", "Patient.name.first().family", value={"valueString": "First"}),
        operation("replace", "Patient.name.last().family", value={"valueString": "Last"}),
    )
    assert [name.get("family") for name in result["name"]] == ["First", None, "Last"]


def test_replace_a_primitive_in_a_list_by_where_on_this(patient: dict) -> None:
    result = fhirpath_patch(
        patient,
        operation("replace", "Patient.name.given.where($this = 'Jim')", value={"valueString": "Jimmy"}),
    )
    assert result["name"][1]["given"] == ["Jimmy"]


def test_replace_a_primitive_replaces_its_extensions_too(patient: dict) -> None:
    result = fhirpath_patch(
        patient, operation("replace", "Patient.birthDate", value={"valueDate": "1974-12-26"})
    )
    assert result["birthDate"] == "1974-12-26"
    assert "_birthDate" not in result


def test_replace_a_primitive_with_a_value_that_carries_an_extension(patient: dict) -> None:
    extension = {"url": BIRTH_TIME, "valueDateTime": "1974-12-26T01:00:00+08:00"}
    result = fhirpath_patch(
        patient,
        operation(
            "replace",
            "Patient.birthDate",
            value={"valueDate": "1974-12-26", "_valueDate": {"extension": [extension]}},
        ),
    )
    assert result["birthDate"] == "1974-12-26"
    assert result["_birthDate"] == {"extension": [extension]}


def test_replace_the_value_of_an_extension_selected_by_url(patient: dict) -> None:
    result = fhirpath_patch(
        patient,
        operation(
            "replace",
            f"Patient.birthDate.extension('{BIRTH_TIME}').value",
            value={"valueDateTime": "1974-12-25T15:00:00-05:00"},
        ),
    )
    assert result["_birthDate"]["extension"][0]["valueDateTime"] == "1974-12-25T15:00:00-05:00"


def test_replace_selected_with_of_type(blood_pressure: dict) -> None:
    result = fhirpath_patch(
        blood_pressure,
        operation(
            "replace", "Observation.component.value.ofType(Quantity).unit", value={"valueString": "mm Hg"}
        ),
    )
    assert result["component"][0]["valueQuantity"]["unit"] == "mm Hg"


def test_replace_a_backbone_element_from_parts(patient: dict) -> None:
    result = fhirpath_patch(
        patient,
        operation(
            "replace",
            "Patient.contact[0]",
            value={
                "part": [
                    {"name": "name", "valueHumanName": {"text": "李四"}},
                    {"name": "telecom", "valueContactPoint": {"system": "phone", "value": "13800000000"}},
                    {"name": "telecom", "valueContactPoint": {"system": "email", "value": "li@example.org"}},
                ]
            },
        ),
    )
    assert result["contact"] == [
        {
            "name": {"text": "李四"},
            "telecom": [
                {"system": "phone", "value": "13800000000"},
                {"system": "email", "value": "li@example.org"},
            ],
        }
    ]


def test_replace_inside_a_contained_resource() -> None:
    source = {
        "resourceType": "Patient",
        "contained": [
            {"resourceType": "Organization", "id": "a", "name": "Old"},
            {"resourceType": "Organization", "id": "b", "name": "Other"},
        ],
    }
    result = fhirpath_patch(
        source,
        operation("replace", "Patient.contained.where(id='a').name", value={"valueString": "乡镇卫生院"}),
    )
    assert result["contained"][0]["name"] == "乡镇卫生院"
    assert result["contained"][1]["name"] == "Other"


def test_replace_path_matching_nothing_is_an_error(patient: dict) -> None:
    error = fhirpath_error(
        patient, operation("replace", "Patient.maritalStatus", value={"valueCodeableConcept": {}})
    )
    assert error.status_code == 422
    assert str(error).startswith("operation 0, path 'Patient.maritalStatus':")
    assert error.index == 0
    assert error.path == "Patient.maritalStatus"
    assert error.expression == ["Patient.maritalStatus"]
    assert error.issue_code == "processing"


def test_replace_with_indexer_out_of_range_is_an_error(patient: dict) -> None:
    error = fhirpath_error(
        patient, operation("replace", "Patient.name[5].family", value={"valueString": "X"})
    )
    assert "no element" in str(error)


def test_replace_path_matching_several_elements_is_an_error(patient: dict) -> None:
    error = fhirpath_error(patient, operation("replace", "Patient.name.given", value={"valueString": "X"}))
    assert "5 elements" in str(error)


def test_replace_without_value_is_malformed(patient: dict) -> None:
    error = fhirpath_error(patient, operation("replace", "Patient.gender"))
    assert error.status_code == 400
    assert "'value'" in str(error)


def test_replace_the_id_is_refused(patient: dict) -> None:
    error = fhirpath_error(patient, operation("replace", "Patient.id", value={"valueId": "other"}))
    assert "owned by the server" in str(error)


def test_replace_the_resource_itself_is_an_error(patient: dict) -> None:
    error = fhirpath_error(
        patient, operation("replace", "Patient", value={"resource": {"resourceType": "Patient"}})
    )
    assert "the resource itself" in str(error)


def test_replace_with_two_values_is_malformed(patient: dict) -> None:
    error = fhirpath_error(
        patient,
        operation("replace", "Patient.gender", value={"valueCode": "female", "valueString": "female"}),
    )
    assert error.status_code == 400


# ---------------------------------------------------------------------------------------------------
# FHIRPath Patch: paths and the Parameters body
# ---------------------------------------------------------------------------------------------------


def test_path_may_omit_the_resource_type(patient: dict) -> None:
    result = fhirpath_patch(patient, operation("replace", "gender", value={"valueCode": "female"}))
    assert result["gender"] == "female"


def test_path_for_another_resource_type_is_an_error(patient: dict) -> None:
    error = fhirpath_error(patient, operation("replace", "Observation.status", value={"valueCode": "final"}))
    assert "resource is a Patient" in str(error)


@pytest.mark.parametrize(
    "path",
    [
        "Patient..name",
        "Patient.name.",
        "Patient.name.where(use='official'",
        "Patient.name[x]",
        "",
        "Patient.name.where()",
        "Patient.name.first(1)",
        "Patient.extension(url)",
    ],
)
def test_unparsable_path_is_malformed(patient: dict, path: str) -> None:
    bad = operation("delete", "Patient")
    bad["part"][1] = {"name": "path", "valueString": path}
    assert fhirpath_error(patient, bad).status_code == 400


def test_unsupported_function_is_malformed(patient: dict) -> None:
    error = fhirpath_error(patient, operation("delete", "Patient.managingOrganization.resolve().name"))
    assert error.status_code == 400
    assert "resolve()" in str(error)


def test_invalid_where_condition_is_malformed(patient: dict) -> None:
    error = fhirpath_error(patient, operation("delete", "Patient.name.where(use = )"))
    assert error.status_code == 400


def test_where_with_boolean_conditions(patient: dict) -> None:
    result = fhirpath_patch(
        patient, operation("delete", "Patient.telecom.where(system = 'phone' and use = 'old')")
    )
    assert [telecom["use"] for telecom in result["telecom"]] == ["home", "work", "mobile"]
    result = fhirpath_patch(
        patient, operation("delete", "Patient.telecom.where(rank > 1 or use = 'home').first()")
    )
    assert [telecom["use"] for telecom in result["telecom"]] == ["work", "mobile", "old"]


def test_where_on_a_boolean_element() -> None:
    source = {
        "resourceType": "Patient",
        "communication": [{"language": {"text": "en"}}, {"language": {"text": "zh"}, "preferred": True}],
    }
    result = fhirpath_patch(
        source,
        operation(
            "replace",
            "Patient.communication.where(preferred = true).language.text",
            value={"valueString": "zh-CN"},
        ),
    )
    assert result["communication"][1]["language"] == {"text": "zh-CN"}


def test_backticked_identifiers(patient: dict) -> None:
    result = fhirpath_patch(patient, operation("replace", "Patient.`gender`", value={"valueCode": "other"}))
    assert result["gender"] == "other"


def test_invalid_operation_type_is_malformed(patient: dict) -> None:
    error = fhirpath_error(patient, operation("upsert", "Patient.gender", value={"valueCode": "male"}))
    assert error.status_code == 400
    assert "unknown operation type 'upsert'" in str(error)


def test_operation_index_is_reported_for_later_operations(patient: dict) -> None:
    error = fhirpath_error(
        patient,
        operation("replace", "Patient.gender", value={"valueCode": "female"}),
        operation("replace", "Patient.maritalStatus", value={"valueCodeableConcept": {"text": "M"}}),
    )
    assert error.index == 1
    assert str(error).startswith("operation 1,")


def test_parameter_not_named_operation_is_malformed(patient: dict) -> None:
    body = {"resourceType": "Parameters", "parameter": [{"name": "op", "part": []}]}
    with pytest.raises(PatchError) as caught:
        apply_fhirpath_patch(patient, body)
    assert caught.value.status_code == 400


def test_unknown_part_is_malformed(patient: dict) -> None:
    bad = operation("delete", "Patient.gender")
    bad["part"].append({"name": "when", "valueString": "now"})
    assert fhirpath_error(patient, bad).status_code == 400


def test_body_must_be_parameters(patient: dict) -> None:
    with pytest.raises(PatchError):
        apply_fhirpath_patch(patient, {"resourceType": "Patient"})
    with pytest.raises(PatchError):
        apply_fhirpath_patch(patient, [])  # type: ignore[arg-type]


def test_operations_apply_in_order(patient: dict) -> None:
    result = fhirpath_patch(
        patient,
        operation("add", "Patient", name="maritalStatus", value={"valueCodeableConcept": {"text": "M"}}),
        operation("replace", "Patient.maritalStatus.text", value={"valueString": "Married"}),
        operation("delete", "Patient.telecom[0]"),
        operation("delete", "Patient.telecom[0]"),
    )
    assert result["maritalStatus"] == {"text": "Married"}
    assert [telecom["use"] for telecom in result["telecom"]] == ["mobile", "old"]


def test_a_failing_operation_leaves_the_input_untouched(patient: dict) -> None:
    before = copy.deepcopy(patient)
    fhirpath_error(patient, operation("delete", "Patient.telecom[0]"), operation("delete", "Patient.telecom"))
    assert patient == before


def test_fhirpath_patch_never_mutates_its_inputs(patient: dict) -> None:
    body = parameters(
        operation(
            "add", "Patient", name="contact", value={"part": [{"name": "gender", "valueCode": "male"}]}
        ),
        operation("add", "Patient.contact[1]", name="name", value={"valueHumanName": {"text": "x"}}),
        operation("delete", "Patient.birthDate.extension[0]"),
        operation("move", "Patient.name", source=0, destination=2),
    )
    resource_before, body_before = copy.deepcopy(patient), copy.deepcopy(body)
    result = apply_fhirpath_patch(patient, body)
    assert patient == resource_before and body == body_before
    assert result["contact"][1] == {"gender": "male", "name": {"text": "x"}}
    result["name"][0]["family"] = "changed"
    assert patient == resource_before


# ---------------------------------------------------------------------------------------------------
# JSON Patch
# ---------------------------------------------------------------------------------------------------


def json_patch(resource: dict, *operations: dict) -> dict:
    result = apply_json_patch(resource, list(operations))
    assert_clean(result)
    return result


def json_patch_error(resource: dict, *operations: Any) -> PatchError:
    with pytest.raises(PatchError) as caught:
        apply_json_patch(resource, list(operations))
    return caught.value


def test_json_patch_replace(patient: dict) -> None:
    assert json_patch(patient, {"op": "replace", "path": "/gender", "value": "female"})["gender"] == "female"


def test_json_patch_add_to_the_end_of_an_array(patient: dict) -> None:
    result = json_patch(patient, {"op": "add", "path": "/name/-", "value": {"text": "Jimmy"}})
    assert result["name"][-1] == {"text": "Jimmy"}


def test_json_patch_add_a_new_member(patient: dict) -> None:
    result = json_patch(patient, {"op": "add", "path": "/maritalStatus", "value": {"text": "M"}})
    assert result["maritalStatus"] == {"text": "M"}


def test_json_patch_remove(patient: dict) -> None:
    result = json_patch(patient, {"op": "remove", "path": "/telecom/0"})
    assert len(result["telecom"]) == 3


def test_json_patch_move_and_copy(patient: dict) -> None:
    result = json_patch(
        patient,
        {"op": "copy", "from": "/name/0/family", "path": "/name/1/family"},
        {"op": "move", "from": "/telecom/3", "path": "/telecom/0"},
    )
    assert result["name"][1]["family"] == "Chalmers"
    assert result["telecom"][0]["use"] == "old"


def test_json_patch_test_then_replace(patient: dict) -> None:
    result = json_patch(
        patient,
        {"op": "test", "path": "/id", "value": "example"},
        {"op": "test", "path": "/gender", "value": "male"},
        {"op": "replace", "path": "/gender", "value": "female"},
    )
    assert result["gender"] == "female"


def test_json_patch_meta_edits_are_allowed(patient: dict) -> None:
    result = json_patch(patient, {"op": "add", "path": "/meta", "value": {"tag": [{"code": "vip"}]}})
    assert result["meta"] == {"tag": [{"code": "vip"}]}


def test_json_patch_removing_the_last_item_removes_the_array(patient: dict) -> None:
    result = json_patch(patient, {"op": "remove", "path": "/identifier/0"})
    assert "identifier" not in result


def test_json_patch_nulls_and_empty_objects_are_removed(patient: dict) -> None:
    result = json_patch(
        patient,
        {"op": "replace", "path": "/managingOrganization", "value": {}},
        {"op": "add", "path": "/maritalStatus", "value": None},
        {"op": "replace", "path": "/address/0/line", "value": []},
    )
    assert "managingOrganization" not in result and "maritalStatus" not in result
    assert "line" not in result["address"][0]


def test_json_patch_replace_of_the_same_id_is_allowed(patient: dict) -> None:
    assert json_patch(patient, {"op": "replace", "path": "/id", "value": "example"}) == patient


def test_json_patch_test_failure_is_an_error(patient: dict) -> None:
    error = json_patch_error(
        patient,
        {"op": "replace", "path": "/active", "value": False},
        {"op": "test", "path": "/gender", "value": "female"},
    )
    assert error.index == 1
    assert error.path == "/gender"
    assert error.status_code == 422
    assert str(error).startswith("operation 1, path '/gender': test failed")


@pytest.mark.parametrize("path", ["/maritalStatus/text", "/name/10/family", "/name/x"])
def test_json_patch_bad_path_is_an_error(patient: dict, path: str) -> None:
    error = json_patch_error(patient, {"op": "replace", "path": path, "value": "x"})
    assert error.index == 0 and error.path == path


def test_json_patch_remove_of_a_missing_member_is_an_error(patient: dict) -> None:
    assert json_patch_error(patient, {"op": "remove", "path": "/maritalStatus"}).status_code == 422


def test_json_patch_add_past_the_end_is_an_error(patient: dict) -> None:
    json_patch_error(patient, {"op": "add", "path": "/name/4", "value": {"text": "x"}})


@pytest.mark.parametrize(
    "bad",
    [
        {"op": "upsert", "path": "/gender", "value": "x"},
        {"path": "/gender", "value": "x"},
        {"op": "replace", "value": "x"},
        {"op": "replace", "path": "gender", "value": "x"},
        {"op": "replace", "path": "/gender"},
        {"op": "add", "path": "/gender"},
        {"op": "test", "path": "/gender"},
        {"op": "move", "path": "/gender"},
        {"op": "copy", "path": "/gender"},
        "replace /gender",
    ],
)
def test_json_patch_malformed_operation(patient: dict, bad: Any) -> None:
    error = json_patch_error(patient, {"op": "test", "path": "/id", "value": "example"}, bad)
    assert error.status_code == 400
    assert error.index == 1


def test_json_patch_body_must_be_an_array(patient: dict) -> None:
    with pytest.raises(PatchError) as caught:
        apply_json_patch(patient, {"op": "remove", "path": "/gender"})  # type: ignore[arg-type]
    assert caught.value.status_code == 400


@pytest.mark.parametrize(
    "bad",
    [
        {"op": "replace", "path": "/id", "value": "other"},
        {"op": "remove", "path": "/id"},
        {"op": "move", "from": "/id", "path": "/language"},
        {"op": "copy", "from": "/gender", "path": "/id"},
        {"op": "replace", "path": "/resourceType", "value": "Person"},
        {"op": "remove", "path": "/resourceType"},
        {"op": "replace", "path": "", "value": {"resourceType": "Patient", "id": "other"}},
    ],
)
def test_json_patch_cannot_change_id_or_resource_type(patient: dict, bad: dict) -> None:
    error = json_patch_error(patient, bad)
    assert "owned by the server" in str(error)
    assert error.index == 0


def test_json_patch_never_mutates_its_inputs(patient: dict) -> None:
    operations = [
        {"op": "add", "path": "/contact/-", "value": {"name": {"text": "x"}}},
        {"op": "add", "path": "/contact/1/gender", "value": "female"},
        {"op": "remove", "path": "/telecom/0"},
    ]
    resource_before, operations_before = copy.deepcopy(patient), copy.deepcopy(operations)
    result = apply_json_patch(patient, operations)
    assert patient == resource_before and operations == operations_before
    assert result["contact"][1] == {"name": {"text": "x"}, "gender": "female"}


# ---------------------------------------------------------------------------------------------------
# JSON Merge Patch
# ---------------------------------------------------------------------------------------------------


def merge_patch(resource: dict, patch: dict) -> dict:
    result = apply_merge_patch(resource, patch)
    assert_clean(result)
    return result


def test_merge_patch_replaces_a_member(patient: dict) -> None:
    result = merge_patch(patient, {"gender": "female"})
    assert result == {**patient, "gender": "female"}


def test_merge_patch_null_deletes(patient: dict) -> None:
    result = merge_patch(patient, {"deceasedBoolean": None, "maritalStatus": None})
    assert "deceasedBoolean" not in result and "maritalStatus" not in result


def test_merge_patch_merges_objects_recursively(patient: dict) -> None:
    result = merge_patch(patient, {"managingOrganization": {"display": "县人民医院"}})
    assert result["managingOrganization"] == {"reference": "Organization/1", "display": "县人民医院"}


def test_merge_patch_replaces_arrays_wholesale(patient: dict) -> None:
    result = merge_patch(patient, {"telecom": [{"system": "phone", "value": "13800000000"}]})
    assert result["telecom"] == [{"system": "phone", "value": "13800000000"}]


def test_merge_patch_removes_objects_it_empties(patient: dict) -> None:
    result = merge_patch(
        patient, {"managingOrganization": {"reference": None}, "text": {"status": None, "div": None}}
    )
    assert "managingOrganization" not in result and "text" not in result


def test_merge_patch_removes_empty_arrays_and_objects_it_adds(patient: dict) -> None:
    result = merge_patch(
        patient, {"name": [], "maritalStatus": {}, "photo": [{}], "telecom": [None, {"use": "home"}]}
    )
    assert "name" not in result and "maritalStatus" not in result and "photo" not in result
    assert result["telecom"] == [{"use": "home"}]


def test_merge_patch_with_matching_type_and_id_like_fhirpy_sends(patient: dict) -> None:
    result = merge_patch(patient, {"resourceType": "Patient", "id": "example", "active": False})
    assert result["active"] is False


def test_merge_patch_adds_a_choice_and_removes_the_old_one(blood_pressure: dict) -> None:
    result = merge_patch(
        blood_pressure, {"effectiveDateTime": None, "effectivePeriod": {"start": "2012-09-17"}}
    )
    assert "effectiveDateTime" not in result
    assert result["effectivePeriod"] == {"start": "2012-09-17"}


@pytest.mark.parametrize(
    ("patch", "key"),
    [
        ({"id": "other"}, "id"),
        ({"id": None}, "id"),
        ({"resourceType": "Person"}, "resourceType"),
        ({"resourceType": None}, "resourceType"),
    ],
)
def test_merge_patch_cannot_change_id_or_resource_type(patient: dict, patch: dict, key: str) -> None:
    with pytest.raises(PatchError) as caught:
        apply_merge_patch(patient, patch)
    assert caught.value.path == key
    assert "owned by the server" in str(caught.value)


def test_merge_patch_cannot_give_an_id_to_a_resource_without_one() -> None:
    with pytest.raises(PatchError):
        apply_merge_patch({"resourceType": "Patient"}, {"id": "new"})


@pytest.mark.parametrize("patch", [[], "gender", None, 3])
def test_merge_patch_body_must_be_an_object(patient: dict, patch: Any) -> None:
    with pytest.raises(PatchError) as caught:
        apply_merge_patch(patient, patch)
    assert caught.value.status_code == 400


def test_merge_patch_never_mutates_its_inputs(patient: dict) -> None:
    patch = {
        "contact": [{"name": {"text": "x"}}],
        "managingOrganization": {"display": "y"},
        "birthDate": None,
    }
    resource_before, patch_before = copy.deepcopy(patient), copy.deepcopy(patch)
    result = apply_merge_patch(patient, patch)
    result["contact"][0]["name"]["text"] = "changed"
    result["managingOrganization"]["reference"] = "changed"
    assert patient == resource_before and patch == patch_before


# ---------------------------------------------------------------------------------------------------
# All formats
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("apply", [apply_json_patch, apply_fhirpath_patch, apply_merge_patch])
def test_target_must_be_a_resource(apply: Any) -> None:
    with pytest.raises(PatchError):
        apply({"gender": "male"}, {"resourceType": "Parameters"} if apply is apply_fhirpath_patch else [])


def test_patch_error_is_a_value_error() -> None:
    assert issubclass(PatchError, ValueError)

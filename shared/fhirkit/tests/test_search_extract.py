import copy
import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fhirkit.search import definitions, extract
from fhirkit.search.definitions import PathAlternative, SearchParamDef, WhereEquals

EXAMPLES = Path(__file__).resolve().parents[3].parent / "shared" / "fhir-r4-examples"


def _examples() -> list[Path]:
    assert EXAMPLES.is_dir(), f"official examples not found at {EXAMPLES}"
    types = definitions.all_resource_types()
    return [
        path
        for path in sorted(EXAMPLES.glob("*.json"))
        if json.loads(path.read_bytes()).get("resourceType") in types
    ]


def _fhirpath(resource: dict[str, Any], expression: str) -> list[object]:
    try:
        return extract.compile_fhirpath(expression)(resource)
    except ValueError as exc:
        # Strict FHIRPath `as` refuses a collection of several elements; the dictionary walk
        # (like R4 servers) applies `ofType` semantics there, so compare with that reading.
        assert "singleton" in str(exc)
        lenient = re.sub(r"\((\w[\w.]*) as (\w+)\)", r"\1.ofType(\2)", expression)
        return extract.compile_fhirpath(re.sub(r"\.as\((\w+)\)", r".ofType(\1)", lenient))(resource)


def _param(resource_type: str, name: str) -> SearchParamDef:
    return definitions.parameters_for(resource_type)[name]


# ---------------------------------------------------------------------------- official examples


@pytest.mark.parametrize("path", _examples(), ids=lambda path: path.name)
def test_dict_walk_matches_fhirpath_on_official_example(path: Path) -> None:
    resource = json.loads(path.read_bytes())
    pristine = copy.deepcopy(resource)
    for name, param in definitions.parameters_for(resource["resourceType"]).items():
        if param.paths is None:
            continue
        assert extract.extract_values(resource, param) == _fhirpath(resource, param.expression), name
    assert resource == pristine  # neither the walk nor fhirpathpy may touch the stored JSON


def test_examples_exercise_every_kind_of_path_step() -> None:
    seen: Counter[str] = Counter()
    for path in _examples():
        resource = json.loads(path.read_bytes())
        for param in definitions.parameters_for(resource["resourceType"]).values():
            if param.paths and extract.extract_values(resource, param):
                seen.update(_step_kinds(param.paths))
    assert {"key", "choice", "resolve_is", "where", "index", "union"} <= set(seen), seen


def _step_kinds(paths: tuple[PathAlternative, ...]) -> set[str]:
    kinds = {"union"} if len(paths) > 1 else set()
    for alternative in paths:
        kinds |= {"resolve_is"} if alternative.resolve_is else set()
        for step in alternative.keys:
            kinds.add({str: "key", tuple: "choice", int: "index", WhereEquals: "where"}[type(step)])
    return kinds


# ---------------------------------------------------------------------------- definitions


def test_observation_parameters() -> None:
    params = definitions.parameters_for("Observation")
    expected = {
        "code": "token",
        "subject": "reference",
        "patient": "reference",
        "date": "date",
        "value-quantity": "quantity",
        "_id": "token",
        "_lastUpdated": "date",
    }
    assert {name: params[name].type for name in expected} == expected
    assert params["patient"].targets == ("Patient",)
    assert "Patient" in params["subject"].targets
    assert params["code"].paths == (PathAlternative(("code",)),)
    assert params["_lastUpdated"].paths == (PathAlternative(("meta", "lastUpdated")),)
    assert params["_id"].expression == "Observation.id"


def test_patient_parameters() -> None:
    params = definitions.parameters_for("Patient")
    expected = {
        "identifier": "token",
        "name": "string",
        "family": "string",
        "birthdate": "date",
        "gender": "token",
        "organization": "reference",
    }
    assert {name: params[name].type for name in expected} == expected
    assert params["organization"].targets == ("Organization",)
    assert params["family"].expression == "Patient.name.family"


def test_resource_types_and_skipped_common_parameters() -> None:
    types = definitions.all_resource_types()
    assert len(types) == 44 and {"Binary", "Bundle", "SubscriptionTopic", "Provenance"} <= types
    assert definitions.parameters_for("Medication") == {}
    for resource_type in types:
        params = definitions.parameters_for(resource_type)
        assert {"_id", "_lastUpdated", "_tag", "_profile", "_security", "_source"} <= set(params)
        assert not {"_text", "_content", "_query", "_list", "_has", "_type", "_filter"} & set(params)


def test_multi_base_expressions_are_split_per_type() -> None:
    for resource_type in definitions.all_resource_types():
        for param in definitions.parameters_for(resource_type).values():
            roots = set(re.findall(r"(?:^|\|)\s*\(*\s*([A-Za-z]+)", param.expression))
            assert roots == {resource_type}, (resource_type, param.name, param.expression)


def test_composite_components_are_compiled() -> None:
    param = _param("Observation", "code-value-quantity")
    assert param.type == "composite"
    assert [(c.code, c.type) for c in param.components] == [("code", "token"), ("value-quantity", "quantity")]
    assert param.components[1].paths == (PathAlternative(("valueQuantity",)),)
    # `value.as(DateTime)` names the System type; the FHIR element key is valueDateTime.
    date = _param("Observation", "code-value-date").components[1]
    assert date.paths == (PathAlternative(("valueDateTime",)), PathAlternative(("valuePeriod",)))


# ---------------------------------------------------------------------------- targeted behaviour


def test_choice_element_yields_whichever_concrete_key_is_present() -> None:
    date = _param("Observation", "date")
    assert date.paths == (
        PathAlternative((("effectiveDateTime", "effectivePeriod", "effectiveTiming", "effectiveInstant"),)),
    )
    period = {"start": "2024-01-01", "end": "2024-01-02"}
    assert extract.extract_values({"resourceType": "Observation", "effectivePeriod": period}, date) == [
        period
    ]
    instant = {"resourceType": "Observation", "effectiveInstant": "2024-01-01T10:00:00Z"}
    assert extract.extract_values(instant, date) == ["2024-01-01T10:00:00Z"]
    assert extract.extract_values({"resourceType": "Observation"}, date) == []


def test_as_type_selects_only_that_type() -> None:
    quantity = _param("Observation", "value-quantity")
    as_string = {"resourceType": "Observation", "valueString": "positive"}
    assert extract.extract_values(as_string, quantity) == []
    value = {"value": 7.2, "unit": "mmol/L"}
    assert extract.extract_values({"resourceType": "Observation", "valueQuantity": value}, quantity) == [
        value
    ]
    text = _param("Observation", "value-string")
    coded = {"resourceType": "Observation", "valueCodeableConcept": {"text": "pos"}}
    assert extract.extract_values(coded, text) == ["pos"]


def test_resolve_is_keeps_references_to_that_type_only() -> None:
    refs = [
        {"reference": "Patient/1"},
        {"reference": "https://his.example.cn/fhir/Patient/2"},
        {"reference": "Patient/3/_history/4"},
        {"reference": "Practitioner/5"},
        {"reference": "#contained-patient"},
        {"reference": "urn:uuid:1c2a0f5e-57d4-4d1c-9a8f-3a3b1f0c7b11"},
        {"identifier": {"value": "no literal reference"}, "type": "Patient"},
    ]
    appointment = {"resourceType": "Appointment", "participant": [{"actor": ref} for ref in refs]}
    patient = _param("Appointment", "patient")
    assert extract.extract_values(appointment, patient) == refs[:3]
    assert extract.extract_values(appointment, patient) == _fhirpath(appointment, patient.expression)
    assert extract.extract_values(appointment, _param("Appointment", "practitioner")) == [refs[3]]


def test_union_concatenates_alternatives_and_removes_duplicates() -> None:
    name = _param("Organization", "name")
    organization = {"resourceType": "Organization", "name": "县人民医院", "alias": ["县医院", "县人民医院"]}
    assert extract.extract_values(organization, name) == ["县人民医院", "县医院"]
    assert extract.extract_values(organization, name) == _fhirpath(organization, name.expression)
    patient = _param("AuditEvent", "patient")
    event = {
        "resourceType": "AuditEvent",
        "agent": [{"who": {"reference": "Patient/1"}}, {"who": {"reference": "Device/9"}}],
        "entity": [{"what": {"reference": "Patient/1"}}, {"what": {"reference": "Patient/2"}}],
    }
    assert extract.extract_values(event, patient) == [{"reference": "Patient/1"}, {"reference": "Patient/2"}]


def test_where_equality_and_extension_filters() -> None:
    patient = {
        "resourceType": "Patient",
        "telecom": [
            {"system": "phone", "value": "13800000000"},
            {"system": "email", "value": "a@example.cn"},
            {"value": "no system"},
        ],
    }
    assert extract.extract_values(patient, _param("Patient", "email")) == [patient["telecom"][1]]
    assert extract.extract_values(patient, _param("Patient", "phone")) == [patient["telecom"][0]]
    gene = _param("Observation", "gene-identifier")
    url = "http://hl7.org/fhir/StructureDefinition/observation-geneticsGene"
    wanted = {"url": url, "valueCodeableConcept": {"text": "BRCA1"}}
    observation = {
        "resourceType": "Observation",
        "extension": [{"url": "http://other", "valueString": "x"}, wanted],
    }
    assert extract.extract_values(observation, gene) == [wanted]
    assert extract.extract_values(observation, gene) == _fhirpath(observation, gene.expression)


def test_index_takes_the_first_entry_of_the_collection() -> None:
    composition = _param("Bundle", "composition")
    first = {"resourceType": "Composition", "id": "c"}
    bundle = {
        "resourceType": "Bundle",
        "entry": [{"resource": first}, {"resource": {"resourceType": "Patient"}}],
    }
    assert extract.extract_values(bundle, composition) == [first]


def test_composite_extraction_pairs_components_per_element() -> None:
    bp = {
        "resourceType": "Observation",
        "code": {"text": "BP"},
        "component": [
            {"code": {"text": "systolic"}, "valueQuantity": {"value": 120}},
            {"code": {"text": "diastolic"}, "valueQuantity": {"value": 80}},
        ],
    }
    rows = extract.extract_composite(bp, _param("Observation", "component-code-value-quantity"))
    assert rows == [([{"text": "systolic"}], [{"value": 120}]), ([{"text": "diastolic"}], [{"value": 80}])]
    combo = extract.extract_composite(bp, _param("Observation", "combo-code-value-quantity"))
    assert combo[0] == ([{"text": "BP"}], [])
    assert len(combo) == 3


def test_walk_ignores_odd_data() -> None:
    odd = {
        "resourceType": "Patient",
        "name": [None, "not an object", {"family": 5}, {"family": "王"}],
        "telecom": "13800000000",
        "managingOrganization": "Organization/1",
        "generalPractitioner": [{"reference": 5}, {"reference": None}],
    }
    params = definitions.parameters_for("Patient")
    assert extract.extract_values(odd, params["family"]) == [5, "王"]
    assert extract.extract_values(odd, params["email"]) == []
    assert extract.extract_values(odd, params["organization"]) == ["Organization/1"]
    for param in params.values():
        extract.extract_values(odd, param)


# ---------------------------------------------------------------------------- FHIRPath fallback


def test_deceased_uses_the_fhirpath_fallback() -> None:
    deceased = _param("Patient", "deceased")
    assert deceased.paths is None
    assert extract.extract_values({"resourceType": "Patient", "deceasedBoolean": True}, deceased) == [True]
    assert extract.extract_values(
        {"resourceType": "Patient", "deceasedDateTime": "2020-02-02"}, deceased
    ) == [True]
    assert extract.extract_values({"resourceType": "Patient", "deceasedBoolean": False}, deceased) == [False]
    # Nothing is known about a patient without deceased[x]: no value (`:missing=true` finds them).
    assert extract.extract_values({"resourceType": "Patient"}, deceased) == []


def test_fallback_is_compiled_once_and_returns_plain_values() -> None:
    expression = "Observation.valueQuantity"
    assert extract.compile_fhirpath(expression) is extract.compile_fhirpath(expression)
    values = extract.evaluate_fhirpath(
        {"resourceType": "Observation", "valueQuantity": {"value": 6.3}}, expression
    )
    assert values == [{"value": 6.3}] and type(values[0]["value"]) is float  # type: ignore[index]
    resolved = extract.evaluate_fhirpath(
        {"resourceType": "Observation", "subject": {"reference": "Group/1"}},
        "Observation.subject.where(resolve() is Patient)",
    )
    assert resolved == []


def test_fallback_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    several = {
        "resourceType": "Observation",
        "component": [{"valueQuantity": {"value": 1}}, {"valueQuantity": {"value": 2}}],
    }
    with caplog.at_level(logging.DEBUG, logger="fhirkit.search.extract"):
        assert extract.evaluate_fhirpath(several, "(Observation.component.value as Quantity)") == []
        assert extract.evaluate_fhirpath(several, "Observation.component.noSuchFunction()") == []
        odd = {"resourceType": "Patient", "deceasedBoolean": "yes"}
        assert extract.evaluate_fhirpath(odd, _param("Patient", "deceased").expression) in (
            [],
            [True],
            [False],
        )
    assert "failed" in caplog.text and "value" not in caplog.text.split("failed", 1)[1]


def test_index_rows_skip_only_parameters_that_select_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """`index_rows` passes over a parameter none of whose paths starts at a key the resource has:
    on every official example it must give the rows of walking every parameter."""
    from fhirkit.store import indexing

    resources = [json.loads(path.read_bytes()) for path in _examples()]
    skipping = [indexing.index_rows(resource) for resource in resources]
    monkeypatch.setattr(indexing, "_roots", lambda param: None)  # every parameter walked
    indexing._indexers.cache_clear()
    try:
        walking_all = [indexing.index_rows(resource) for resource in resources]
    finally:
        indexing._indexers.cache_clear()
    assert skipping == walking_all
    assert sum(len(rows) for by_kind in skipping for rows in by_kind.values()) > 2000  # the examples index


def test_a_choice_element_and_a_nested_path_name_their_top_level_keys() -> None:
    from fhirkit.store import indexing

    assert indexing._roots(_param("Observation", "date")) == {
        "effectiveDateTime", "effectivePeriod", "effectiveTiming", "effectiveInstant"}
    assert indexing._roots(_param("Observation", "combo-code")) == {"code", "component"}
    walked_by_fhirpath = next(p for t in definitions.all_resource_types()
                              for p in definitions.parameters_for(t).values() if p.paths is None)
    assert indexing._roots(walked_by_fhirpath) is None

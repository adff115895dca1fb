import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from fhir.resources.R4B import get_fhir_model_class

from directory.directory_file import (
    DEMO_ALLIANCE_PATH,
    DirectoryContent,
    DirectoryFileError,
    parse_directory_file,
    parse_directory_text,
)
from directory.identifiers import (
    FACILITY_CODES,
    FACILITY_LEVEL_SYSTEM,
    NATIONAL_ID_SYSTEM,
    USCC_SYSTEM,
    is_valid_national_id,
    is_valid_uscc,
    mrn_system,
    national_id_birth_date,
    national_id_gender,
)

REPO = Path(__file__).resolve().parents[3]

# --- the demo alliance ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo() -> DirectoryContent:
    return parse_directory_file(DEMO_ALLIANCE_PATH)


def _level(org: dict) -> str:
    return next(c["code"] for t in org["type"] for c in t["coding"] if c["system"] == FACILITY_LEVEL_SYSTEM)


def _parent(org: dict) -> str | None:
    return org["partOf"]["reference"].removeprefix("Organization/") if "partOf" in org else None


def test_demo_counts(demo: DirectoryContent) -> None:
    levels = Counter(_level(o) for o in demo.organizations)
    assert levels["provincial-hospital"] == 1
    assert levels["city-hospital"] == 1
    assert levels["county-hospital"] == 1
    assert levels["township-health-center"] >= 8
    assert levels["village-clinic"] >= 20
    for code, facility in FACILITY_CODES.items():
        if facility.kind != "tier":
            assert levels[code] == 1, code
    assert len(demo.patients) >= 200
    assert len(demo.practitioners) >= 50
    assert len(demo.practitioner_roles) >= len(demo.practitioners)
    assert demo.alliance == "青溪县医疗健康集团"


def test_every_demo_resource_validates_with_r4b(demo: DirectoryContent) -> None:
    for resource in demo.resources():
        model = get_fhir_model_class(resource["resourceType"])
        model.model_validate(resource)


def test_demo_ids_are_unique_per_type(demo: DirectoryContent) -> None:
    keys = [f"{r['resourceType']}/{r['id']}" for r in demo.resources()]
    assert len(keys) == len(set(keys))
    assert set(demo.lines) == set(keys)


def test_demo_tree_shape(demo: DirectoryContent) -> None:
    by_id = {o["id"]: o for o in demo.organizations}
    county = next(o for o in demo.organizations if _level(o) == "county-hospital")
    for org in demo.organizations:
        level, parent = _level(org), _parent(org)
        expected = {
            "provincial-hospital": None,
            "city-hospital": "provincial-hospital",
            "county-hospital": "city-hospital",
            "township-health-center": "county-hospital",
            "village-clinic": "township-health-center",
        }.get(level, "county-hospital")
        assert (parent and _level(by_id[parent])) == expected, org["id"]
        if FACILITY_CODES[level].kind != "tier":
            assert parent == county["id"]
    # every township center has village clinics under it, and villages are spread over them
    townships = [o["id"] for o in demo.organizations if _level(o) == "township-health-center"]
    villages_per_township = Counter(_parent(o) for o in demo.organizations if _level(o) == "village-clinic")
    assert set(villages_per_township) == set(townships)


def test_organizations_come_parent_first(demo: DirectoryContent) -> None:
    seen: set[str] = set()
    for org in demo.organizations:
        parent = _parent(org)
        assert parent is None or parent in seen, org["id"]
        seen.add(org["id"])


def test_resources_are_in_dependency_order(demo: DirectoryContent) -> None:
    types = [r["resourceType"] for r in demo.resources()]
    order = ["Organization", "Endpoint", "Practitioner", "PractitionerRole", "Patient"]
    assert [t for i, t in enumerate(types) if i == 0 or types[i - 1] != t] == order


def test_demo_organization_shape(demo: DirectoryContent) -> None:
    county = next(o for o in demo.organizations if _level(o) == "county-hospital")
    assert county["name"] == "青溪县人民医院"
    assert county["type"][0]["coding"][0] == {
        "system": FACILITY_LEVEL_SYSTEM,
        "code": "county-hospital",
        "display": "县医院",
    }
    [uscc] = county["identifier"]
    assert uscc["system"] == USCC_SYSTEM and is_valid_uscc(uscc["value"])
    assert county["address"][0]["district"] == "青溪县" and county["address"][0]["state"] == "浙江省"
    for org in demo.organizations:
        for identifier in org.get("identifier", []):
            assert is_valid_uscc(identifier["value"])
        if FACILITY_CODES[_level(org)].kind == "tier" and _level(org) != "village-clinic":
            assert org.get("identifier"), org["id"]


def test_demo_patients_are_consistent(demo: DirectoryContent) -> None:
    org_ids = {o["id"] for o in demo.organizations}
    national_ids = []
    for patient in demo.patients:
        [nid] = [i for i in patient["identifier"] if i["system"] == NATIONAL_ID_SYSTEM]
        assert nid["use"] == "official" and nid["type"]["coding"][0]["code"] == "NI"
        assert is_valid_national_id(nid["value"])
        assert patient["birthDate"] == national_id_birth_date(nid["value"]).isoformat()
        assert patient["gender"] == national_id_gender(nid["value"])
        national_ids.append(nid["value"])
        mrns = [i for i in patient["identifier"] if i["type"]["coding"][0]["code"] == "MR"]
        assert mrns, patient["id"]
        for mrn in mrns:
            org_id = mrn["assigner"]["reference"].removeprefix("Organization/")
            assert org_id in org_ids and mrn["system"] == mrn_system(org_id)
        assert patient["telecom"][0]["system"] == "phone"
        assert patient["address"][0]["text"].startswith("浙江省衢州市青溪县")
        assert patient["name"][0]["family"] + patient["name"][0]["given"][0] == patient["name"][0]["text"]
    assert len(set(national_ids)) == len(national_ids)


def test_demo_practitioners(demo: DirectoryContent) -> None:
    titles = {
        p["id"]: p["qualification"][0]["code"]["text"] for p in demo.practitioners if "qualification" in p
    }
    org_level = {o["id"]: _level(o) for o in demo.organizations}

    def roles_at(level: str) -> list[tuple[str, str, str]]:
        return [
            (
                titles.get(r["practitioner"]["reference"].split("/")[1], ""),
                r["code"][0]["coding"][0]["code"],
                r.get("specialty", [{"coding": [{"code": ""}]}])[0]["coding"][0]["code"],
            )
            for r in demo.practitioner_roles
            if org_level[r["organization"]["reference"].split("/")[1]] == level
        ]

    for level in ("provincial-hospital", "city-hospital"):
        assert any(title == "主任医师" for title, _, _ in roles_at(level)), level
    assert (
        sum(1 for _, role, spec in roles_at("imaging-center") if role == "doctor" and spec == "radiology")
        >= 2
    )
    assert sum(1 for _, role, spec in roles_at("ecg-center") if spec == "ecg-diagnosis") >= 2
    assert any(spec == "pathology" and role == "doctor" for _, role, spec in roles_at("pathology-center"))
    for level in FACILITY_CODES:
        if level != "village-clinic":
            assert roles_at(level), level


def test_demo_endpoints(demo: DirectoryContent) -> None:
    imaging = next(o["id"] for o in demo.organizations if _level(o) == "imaging-center")
    at_imaging = {
        e["connectionType"]["code"]
        for e in demo.endpoints
        if e["managingOrganization"]["reference"] == f"Organization/{imaging}"
    }
    assert {"dicom-wado-rs", "hl7-fhir-rest"} <= at_imaging


def test_demo_file_is_what_the_generator_writes() -> None:
    script = REPO / "scripts" / "generate_demo_alliance.py"
    result = subprocess.run(
        [sys.executable, str(script), "--check"], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_parsing_is_deterministic(demo: DirectoryContent) -> None:
    assert parse_directory_file(DEMO_ALLIANCE_PATH).resources() == demo.resources()


# --- small files and their errors ------------------------------------------------------------------------------

HEAD = """\
alliance: 测试医共体
organizations:
  - id: city
    name: 测试市人民医院
    level: city-hospital
    uscc: "91350100M000100Y43"
  - id: county
    name: 测试县人民医院
    level: county-hospital
    parent: city
    uscc: "91110108551385082Q"
  - id: thc
    name: 测试镇中心卫生院
    level: township-health-center
    parent: county
    uscc: "91440300708461136T"
"""

PRACTITIONER = """\
practitioners:
  - id: doc
    name: 欧阳明
    gender: 男
    organization: county
    title: 主治医师
    roles:
      - {role: doctor, specialty: cardiology}
      - {role: doctor, specialty: 全科医疗科, organization: thc}
    identifiers:
      - {system: "urn:oid:2.16.156.10011.1.3", value: "11010519491231002X"}
"""

PATIENT = """\
patients:
  - id: pat
    name: 李秀英
    gender: female
    birth_date: 1949-12-31
    national_id: "11010519491231002x"
    phone: "13905701234"
    address: 测试县测试镇1号
    mrns:
      - {organization: county, value: "00012345"}
      - {organization: thc, value: "TH0001"}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "alliance.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    hits = [n for n, line in enumerate(text.splitlines(), 1) if needle in line]
    return hits[occurrence - 1]


def errors_of(tmp_path: Path, text: str) -> DirectoryFileError:
    path = write(tmp_path, text)
    with pytest.raises(DirectoryFileError) as caught:
        parse_directory_file(path)
    assert caught.value.path == str(path)
    return caught.value


def assert_error(tmp_path: Path, text: str, line: int, fragment: str) -> None:
    error = errors_of(tmp_path, text)
    expected = f"{tmp_path / 'alliance.yaml'}:{line}: "
    matching = [str(i) for i in error.issues if str(i).startswith(expected) and fragment in i.message]
    assert matching, f"no error '{fragment}' on line {line} in:\n{error}"
    assert expected in str(error)


def test_small_file_parses(tmp_path: Path) -> None:
    content = parse_directory_file(write(tmp_path, HEAD + PRACTITIONER + PATIENT))
    assert [o["id"] for o in content.organizations] == ["city", "county", "thc"]
    [doc] = content.practitioners
    assert doc["name"][0] == {"use": "official", "text": "欧阳明", "family": "欧阳", "given": ["明"]}
    assert doc["gender"] == "male"
    assert doc["qualification"][0]["code"]["coding"][0]["code"] == "attending-physician"
    roles = {r["id"]: r for r in content.practitioner_roles}
    assert set(roles) == {"doc-doctor", "doc-doctor-thc"}
    assert roles["doc-doctor-thc"]["specialty"][0]["coding"][0]["code"] == "general-practice"
    [patient] = content.patients
    assert patient["identifier"][0]["value"] == "11010519491231002X"  # lower-case x normalised
    assert [i["system"] for i in patient["identifier"][1:]] == [mrn_system("county"), mrn_system("thc")]
    assert patient["identifier"][1]["value"] == "00012345"  # text stays text: leading zeros kept
    assert patient["identifier"][1]["assigner"] == {
        "reference": "Organization/county",
        "display": "测试县人民医院",
    }
    assert content.lines["Patient/pat"] == line_of(HEAD + PRACTITIONER + PATIENT, "- id: pat")
    for resource in content.resources():
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)


def test_gender_and_birth_date_may_come_from_the_national_id(tmp_path: Path) -> None:
    text = HEAD + 'patients:\n  - id: p\n    name: 王芳\n    national_id: "11010519491231002X"\n'
    [patient] = parse_directory_file(write(tmp_path, text)).patients
    assert (patient["gender"], patient["birthDate"]) == ("female", "1949-12-31")


def test_error_lines_are_exact(tmp_path: Path) -> None:
    text = HEAD.replace("parent: county", "parent: nowhere")
    error = errors_of(tmp_path, text)
    assert error.line == 15
    assert str(error) == f"{tmp_path / 'alliance.yaml'}:15: organization 'thc': unknown parent 'nowhere'"


def test_bad_uscc(tmp_path: Path) -> None:
    text = HEAD.replace("91110108551385082Q", "91110108551385082R")
    assert_error(tmp_path, text, line_of(text, "82R"), "check character should be 'Q'")


def test_missing_uscc_for_a_hospital(tmp_path: Path) -> None:
    text = HEAD.replace('    uscc: "91440300708461136T"\n', "")
    assert_error(tmp_path, text, line_of(text, "- id: thc"), "missing required field 'uscc'")


def test_bad_national_id(tmp_path: Path) -> None:
    text = HEAD + PATIENT.replace("11010519491231002x", "110105194912310021")
    assert_error(tmp_path, text, line_of(text, "national_id"), "check character should be 'X'")


def test_national_id_with_impossible_date(tmp_path: Path) -> None:
    text = HEAD + PATIENT.replace("11010519491231002x", "110105199902300021")
    assert_error(tmp_path, text, line_of(text, "national_id"), "birth date 19990230 is not a real date")


def test_birth_date_must_match_national_id(tmp_path: Path) -> None:
    text = HEAD + PATIENT.replace("1949-12-31", "1949-12-30")
    assert_error(tmp_path, text, line_of(text, "birth_date"), "does not match national ID")


def test_gender_must_match_national_id(tmp_path: Path) -> None:
    text = HEAD + PATIENT.replace("gender: female", "gender: male")
    assert_error(tmp_path, text, line_of(text, "gender: male"), "17th digit says female")


def test_unknown_level(tmp_path: Path) -> None:
    text = HEAD.replace("level: township-health-center", "level: township-hospital")
    assert_error(tmp_path, text, line_of(text, "township-hospital"), "unknown level 'township-hospital'")


def test_unknown_parent(tmp_path: Path) -> None:
    text = HEAD.replace("parent: city", "parent: capital")
    assert_error(tmp_path, text, line_of(text, "parent: capital"), "unknown parent 'capital'")


def test_parent_of_the_wrong_level(tmp_path: Path) -> None:
    # a county hospital under a township center
    text = (
        HEAD
        + """\
  - id: county2
    name: 另一县医院
    level: county-hospital
    parent: thc
    uscc: "91110000802100433B"
"""
    )
    assert_error(tmp_path, text, line_of(text, "parent: thc"), "a county-hospital cannot be part of 'thc'")


def test_village_clinic_needs_a_parent(tmp_path: Path) -> None:
    text = HEAD + "  - id: vc\n    name: 测试村卫生室\n    level: village-clinic\n"
    assert_error(tmp_path, text, line_of(text, "- id: vc"), "missing required field 'parent'")


def test_cycle(tmp_path: Path) -> None:
    text = HEAD.replace(
        '    uscc: "91350100M000100Y43"\n', '    parent: thc\n    uscc: "91350100M000100Y43"\n'
    )
    error = errors_of(tmp_path, text)
    cycles = [i for i in error.issues if "parent cycle" in i.message]
    assert len(cycles) == 1  # reported once, on the first member in the file
    assert cycles[0].line == line_of(text, "parent: thc")
    assert cycles[0].message == "organization 'city': parent cycle: city → thc → county → city"


def test_self_parent_is_a_cycle(tmp_path: Path) -> None:
    text = HEAD.replace("parent: county", "parent: thc")
    assert_error(tmp_path, text, line_of(text, "parent: thc"), "parent cycle: thc → thc")


def test_duplicate_organization_id(tmp_path: Path) -> None:
    text = HEAD + "  - id: county\n    name: 重复\n    level: village-clinic\n    parent: thc\n"
    assert_error(tmp_path, text, line_of(text, "- id: county", 2), "duplicate id 'county' (first on line 7)")


def test_duplicate_patient_and_national_id(tmp_path: Path) -> None:
    text = (
        HEAD
        + PATIENT
        + PATIENT.removeprefix("patients:\n")
        .replace('"TH0001"', '"TH0002"')
        .replace('"00012345"', '"00012346"')
    )
    error = errors_of(tmp_path, text)
    second = line_of(text, "- id: pat", 2)
    assert any(i.line == second and "duplicate id 'pat'" in i.message for i in error.issues)
    assert any("one Patient per person" in i.message for i in error.issues)


def test_practitioner_in_unknown_organization(tmp_path: Path) -> None:
    text = HEAD + PRACTITIONER.replace("organization: county", "organization: hospital-x")
    assert_error(
        tmp_path, text, line_of(text, "organization: hospital-x"), "unknown organization 'hospital-x'"
    )


def test_practitioner_role_at_unknown_organization(tmp_path: Path) -> None:
    text = HEAD + PRACTITIONER.replace("organization: thc}", "organization: thc-x}")
    assert_error(tmp_path, text, line_of(text, "thc-x"), "unknown organization 'thc-x'")


def test_unknown_title_role_and_specialty(tmp_path: Path) -> None:
    text = HEAD + PRACTITIONER.replace("主治医师", "大医师").replace("cardiology", "cardiologyy").replace(
        "{role: doctor, specialty: 全科", "{role: surgeon, specialty: 全科"
    )
    assert_error(tmp_path, text, line_of(text, "大医师"), "unknown title '大医师'")
    assert_error(tmp_path, text, line_of(text, "cardiologyy"), "unknown specialty 'cardiologyy'")
    assert_error(tmp_path, text, line_of(text, "surgeon"), "unknown role 'surgeon'")


def test_mrn_at_unknown_organization(tmp_path: Path) -> None:
    text = HEAD + PATIENT.replace("{organization: thc,", "{organization: thc-y,")
    assert_error(tmp_path, text, line_of(text, "thc-y"), "MRN at unknown organization 'thc-y'")


def test_duplicate_mrn_at_one_organization(tmp_path: Path) -> None:
    other = (
        PATIENT.removeprefix("patients:\n")
        .replace("id: pat", "id: pat2")
        .replace('national_id: "11010519491231002x"', 'national_id: "330829198001011239"')
        .replace("birth_date: 1949-12-31", "birth_date: 1980-01-01")
        .replace("gender: female", "gender: male")
    )
    text = HEAD + PATIENT + other
    assert_error(tmp_path, text, line_of(text, "00012345", 2), "MRN 00012345 at 'county' already used")


@pytest.mark.parametrize(
    ("section", "field"),
    [("organization", "name"), ("organization", "level"), ("practitioner", "roles"), ("patient", "name")],
)
def test_missing_required_fields(tmp_path: Path, section: str, field: str) -> None:
    base = HEAD + PRACTITIONER + PATIENT
    entry = {"organization": "- id: thc", "practitioner": "- id: doc", "patient": "- id: pat"}[section]
    start = line_of(base, entry)
    lines = base.splitlines(keepends=True)
    # drop the field (and, for a list, its items) from that entry only
    drop = next(n for n in range(start, len(lines)) if lines[n].strip().startswith(f"{field}:"))
    end = drop + 1
    while end < len(lines) and lines[end].startswith("      "):
        end += 1
    text = "".join(lines[:drop] + lines[end:])
    assert_error(tmp_path, text, start, f"missing required field '{field}'")


def test_endpoint_errors(tmp_path: Path) -> None:
    text = (
        HEAD
        + """\
endpoints:
  - id: pacs
    organization: county
    connection_type: dicom-wado
    address: https://pacs.example/dicom-web
  - id: fhir
    organization: nowhere
    connection_type: hl7-fhir-rest
    address: https://his.example/fhir
"""
    )
    assert_error(tmp_path, text, line_of(text, "dicom-wado"), "unknown connection_type 'dicom-wado'")
    assert_error(tmp_path, text, line_of(text, "organization: nowhere"), "unknown organization 'nowhere'")


def test_endpoint_shape(tmp_path: Path) -> None:
    text = (
        HEAD
        + """\
endpoints:
  - id: pacs
    organization: county
    connection_type: dicom-wado-rs
    address: https://pacs.example/dicom-web
    name: 县 PACS
"""
    )
    [endpoint] = parse_directory_file(write(tmp_path, text)).endpoints
    assert endpoint["connectionType"]["code"] == "dicom-wado-rs"
    assert endpoint["managingOrganization"]["reference"] == "Organization/county"
    assert endpoint["payloadMimeType"] == ["application/dicom"]
    get_fhir_model_class("Endpoint").model_validate(endpoint)


def test_wrong_shapes(tmp_path: Path) -> None:
    roles_block = PRACTITIONER[PRACTITIONER.index("    roles:") : PRACTITIONER.index("    identifiers:")]
    text = HEAD + PRACTITIONER.replace(roles_block, "    roles: doctor\n")
    assert_error(tmp_path, text, line_of(text, "roles: doctor"), "'roles' must be a list")
    text = HEAD.replace("name: 测试县人民医院", "name: [测试县人民医院]")
    assert_error(tmp_path, text, line_of(text, "[测试县人民医院]"), "'name' must be text")


def test_unknown_field_and_top_level_key(tmp_path: Path) -> None:
    text = HEAD.replace("parent: county", "parnet: county") + "patiens: []\n"
    assert_error(tmp_path, text, line_of(text, "parnet"), "unknown field 'parnet'")
    assert_error(tmp_path, text, line_of(text, "patiens"), "unknown top-level key 'patiens'")


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    text = HEAD.replace("    parent: county\n", "    parent: county\n    parent: city\n")
    assert_error(tmp_path, text, line_of(text, "parent: city", 2), "duplicate key 'parent'")


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    text = HEAD + "practitioners:\n  - id: [unclosed\n    name: x\n"
    error = errors_of(tmp_path, text)
    assert error.line is not None and error.line >= line_of(text, "unclosed")
    assert "not valid YAML" in str(error)


def test_all_errors_are_reported_together_in_line_order(tmp_path: Path) -> None:
    text = (
        (HEAD + PRACTITIONER + PATIENT)
        .replace("91440300708461136T", "91440300708461136A")
        .replace("organization: county\n    title", "organization: nope\n    title")
        .replace("{organization: thc, value", "{organization: nada, value")
    )
    error = errors_of(tmp_path, text)
    lines = [i.line for i in error.issues]
    assert len(error.issues) == 3 and lines == sorted(lines)
    assert str(error).startswith("3 errors in the directory file:")


def test_empty_and_non_mapping_files(tmp_path: Path) -> None:
    assert "must be a mapping" in str(errors_of(tmp_path, "- just\n- a list\n"))
    assert "missing required field 'alliance'" in str(errors_of(tmp_path, "organizations: []\n"))


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(DirectoryFileError, match="cannot read"):
        parse_directory_file(tmp_path / "missing.yaml")


def test_the_documented_example_parses() -> None:
    doc = (REPO / "docs" / "directory-file.md").read_text(encoding="utf-8")
    example = doc.split("## Example\n\n```yaml\n", 1)[1].split("```", 1)[0]
    content = parse_directory_text(example, source="docs/directory-file.md")
    assert [r["resourceType"] for r in content.resources()][:3] == ["Organization"] * 3
    assert content.patients[0]["gender"] == "female"

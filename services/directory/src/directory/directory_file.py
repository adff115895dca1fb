"""The alliance directory file (YAML): format described in docs/directory-file.md.

``parse_directory_file`` turns one file into FHIR R4 resources (plain JSON dicts) in dependency order, or
raises one ``DirectoryFileError`` listing every problem with the file line it is on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from directory.identifiers import (
    FACILITY_CODES,
    FACILITY_LEVEL_SYSTEM,
    NATIONAL_ID_SYSTEM,
    USCC_SYSTEM,
    allowed_parent_codes,
    is_valid_national_id,
    is_valid_uscc,
    may_be_root,
    mrn_system,
    national_id_birth_date,
    national_id_check_char,
    national_id_gender,
    normalize_national_id,
    normalize_uscc,
    uscc_check_char,
)

DEMO_ALLIANCE_PATH = Path(__file__).parent / "demo" / "alliance.yaml"

V2_IDENTIFIER_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
ORGANIZATION_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/organization-type"
HL7_PRACTITIONER_ROLE_SYSTEM = "http://terminology.hl7.org/CodeSystem/practitioner-role"
ENDPOINT_CONNECTION_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
ENDPOINT_PAYLOAD_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/endpoint-payload-type"
PRACTITIONER_ROLE_SYSTEM = "http://county-alliance.org/fhir/CodeSystem/practitioner-role"
PROFESSIONAL_TITLE_SYSTEM = "http://county-alliance.org/fhir/CodeSystem/professional-title"
SPECIALTY_SYSTEM = "http://county-alliance.org/fhir/CodeSystem/specialty"


# --- Vocabulary the file may use ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RoleCode:
    code: str
    display: str
    hl7: tuple[str, str] | None  # the matching (code, display) in HL7's practitioner-role system, if any


PRACTITIONER_ROLES: dict[str, RoleCode] = {
    r.code: r
    for r in (
        RoleCode("doctor", "医师", ("doctor", "Doctor")),
        RoleCode("nurse", "护士", ("nurse", "Nurse")),
        RoleCode("pharmacist", "药师", ("pharmacist", "Pharmacist")),
        RoleCode("technician", "技师", None),
        RoleCode("village-doctor", "乡村医生", None),
    )
}


@dataclass(frozen=True)
class ProfessionalTitle:
    code: str
    display: str
    series: str  # physician | nursing | technologist | pharmacy
    grade: str  # senior 正高 | associate-senior 副高 | intermediate 中级 | junior 师级 | assistant 士级


PROFESSIONAL_TITLES: dict[str, ProfessionalTitle] = {
    t.code: t
    for t in (
        ProfessionalTitle("chief-physician", "主任医师", "physician", "senior"),
        ProfessionalTitle("associate-chief-physician", "副主任医师", "physician", "associate-senior"),
        ProfessionalTitle("attending-physician", "主治医师", "physician", "intermediate"),
        ProfessionalTitle("resident-physician", "住院医师", "physician", "junior"),
        ProfessionalTitle("assistant-physician", "医士", "physician", "assistant"),
        ProfessionalTitle("chief-nurse", "主任护师", "nursing", "senior"),
        ProfessionalTitle("associate-chief-nurse", "副主任护师", "nursing", "associate-senior"),
        ProfessionalTitle("nurse-in-charge", "主管护师", "nursing", "intermediate"),
        ProfessionalTitle("senior-nurse", "护师", "nursing", "junior"),
        ProfessionalTitle("junior-nurse", "护士", "nursing", "assistant"),
        ProfessionalTitle("chief-technologist", "主任技师", "technologist", "senior"),
        ProfessionalTitle("associate-chief-technologist", "副主任技师", "technologist", "associate-senior"),
        ProfessionalTitle("technologist-in-charge", "主管技师", "technologist", "intermediate"),
        ProfessionalTitle("technologist", "技师", "technologist", "junior"),
        ProfessionalTitle("technician", "技士", "technologist", "assistant"),
        ProfessionalTitle("chief-pharmacist", "主任药师", "pharmacy", "senior"),
        ProfessionalTitle("associate-chief-pharmacist", "副主任药师", "pharmacy", "associate-senior"),
        ProfessionalTitle("pharmacist-in-charge", "主管药师", "pharmacy", "intermediate"),
        ProfessionalTitle("staff-pharmacist", "药师", "pharmacy", "junior"),
        ProfessionalTitle("assistant-pharmacist", "药士", "pharmacy", "assistant"),
    )
}
# 医师 is the formal name of the junior physician title; files often write it instead of 住院医师.
_TITLE_ALIASES = {"医师": "resident-physician"}

SPECIALTIES: dict[str, str] = {
    "general-practice": "全科医疗科",
    "preventive-care": "预防保健科",
    "internal-medicine": "内科",
    "respiratory": "呼吸内科",
    "gastroenterology": "消化内科",
    "neurology": "神经内科",
    "cardiology": "心血管内科",
    "hematology": "血液内科",
    "nephrology": "肾病学",
    "endocrinology": "内分泌",
    "geriatrics": "老年病",
    "surgery": "外科",
    "general-surgery": "普通外科",
    "neurosurgery": "神经外科",
    "orthopedics": "骨科",
    "urology": "泌尿外科",
    "thoracic-surgery": "胸外科",
    "obstetrics-gynecology": "妇产科",
    "obstetrics": "产科",
    "gynecology": "妇科",
    "pediatrics": "儿科",
    "neonatology": "新生儿科",
    "ophthalmology": "眼科",
    "otolaryngology": "耳鼻咽喉科",
    "stomatology": "口腔科",
    "dermatology": "皮肤科",
    "psychiatry": "精神科",
    "infectious-disease": "感染科",
    "oncology": "肿瘤科",
    "emergency-medicine": "急诊医学科",
    "critical-care": "重症医学科",
    "anesthesiology": "麻醉科",
    "rehabilitation": "康复医学科",
    "traditional-chinese-medicine": "中医科",
    "laboratory-medicine": "医学检验科",
    "pathology": "病理科",
    "radiology": "医学影像科",
    "ultrasound": "超声诊断",
    "ecg-diagnosis": "心电诊断",
    "nuclear-medicine": "核医学科",
    "pharmacy": "药剂科",
    "nursing": "护理",
    "sterile-supply": "消毒供应",
}

# HL7 endpoint-connection-type codes (terminology.hl7.org): display, and the payload MIME types each carries.
CONNECTION_TYPES: dict[str, tuple[str, tuple[str, ...]]] = {
    "dicom-wado-rs": ("DICOM WADO-RS", ("application/dicom",)),
    "dicom-qido-rs": ("DICOM QIDO-RS", ("application/dicom+json",)),
    "dicom-stow-rs": ("DICOM STOW-RS", ("application/dicom",)),
    "dicom-wado-uri": ("DICOM WADO-URI", ("application/dicom",)),
    "hl7-fhir-rest": ("HL7 FHIR", ("application/fhir+json",)),
    "hl7-fhir-msg": ("HL7 FHIR Messaging", ("application/fhir+json",)),
    "hl7v2-mllp": ("HL7 v2 MLLP", ("application/hl7-v2",)),
    "ihe-xds": ("IHE XDS", ()),
    "ihe-xca": ("IHE XCA", ()),
    "ihe-xdr": ("IHE XDR", ()),
    "ihe-xcpd": ("IHE XCPD", ()),
    "ihe-iid": ("IHE IID", ()),
    "secure-email": ("Secure email", ()),
    "direct-project": ("Direct Project", ()),
}

_GENDERS = {
    "male": "male",
    "female": "female",
    "other": "other",
    "unknown": "unknown",
    "男": "male",
    "女": "female",
}
# Two-character surnames, so that 欧阳明 splits into family 欧阳 and given 明.
_COMPOUND_SURNAMES = frozenset(
    [
        "欧阳",
        "司马",
        "上官",
        "诸葛",
        "东方",
        "皇甫",
        "尉迟",
        "公孙",
        "慕容",
        "长孙",
        "宇文",
        "司徒",
        "令狐",
        "夏侯",
        "端木",
        "南宫",
    ]
)
_FHIR_ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_PHONE_RE = re.compile(r"\+?[0-9][0-9\- ]{4,19}")
_MOBILE_RE = re.compile(r"1[3-9][0-9]{9}")
_DATE_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


# --- Errors and result -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DirectoryFileIssue:
    message: str
    line: int | None
    path: str | None

    def __str__(self) -> str:
        where = self.path or "<directory file>"
        return f"{where}:{self.line}: {self.message}" if self.line else f"{where}: {self.message}"


class DirectoryFileError(ValueError):
    """Every problem found in one directory file; ``issues`` keeps them in file order."""

    def __init__(
        self,
        message: str,
        line: int | None = None,
        path: str | Path | None = None,
        issues: list[DirectoryFileIssue] | None = None,
    ) -> None:
        self.path = str(path) if path is not None else None
        self.issues = issues or [DirectoryFileIssue(message, line, self.path)]
        self.line = line if line is not None else self.issues[0].line
        if len(self.issues) == 1:
            text = str(self.issues[0])
        else:
            text = f"{len(self.issues)} errors in the directory file:\n" + "\n".join(
                f"  {issue}" for issue in self.issues
            )
        super().__init__(text)


@dataclass
class DirectoryContent:
    alliance: str
    organizations: list[dict[str, Any]] = field(default_factory=list)  # parent before child
    endpoints: list[dict[str, Any]] = field(default_factory=list)
    practitioners: list[dict[str, Any]] = field(default_factory=list)
    practitioner_roles: list[dict[str, Any]] = field(default_factory=list)
    patients: list[dict[str, Any]] = field(default_factory=list)
    source: str | None = None
    # "Organization/abc" → the file line of its entry, so a loader can point at the line the server refused.
    lines: dict[str, int] = field(default_factory=dict)

    def resources(self) -> list[dict[str, Any]]:
        return [
            *self.organizations,
            *self.endpoints,
            *self.practitioners,
            *self.practitioner_roles,
            *self.patients,
        ]


# --- YAML with line numbers ---------------------------------------------------------------------------------


class _Map(dict):
    """A YAML mapping that remembers where it and each of its keys are (1-based lines)."""

    line: int
    key_lines: dict[str, int]


class _Seq(list):
    line: int
    item_lines: list[int]


def _line(node: Node) -> int:
    return node.start_mark.line + 1


class _Issues:
    def __init__(self, path: str | None) -> None:
        self.path = path
        self.items: list[DirectoryFileIssue] = []

    def add(self, line: int | None, message: str) -> None:
        self.items.append(DirectoryFileIssue(message, line, self.path))

    def raise_if_any(self) -> None:
        if self.items:
            ordered = sorted(self.items, key=lambda i: i.line or 0)
            raise DirectoryFileError(ordered[0].message, ordered[0].line, self.path, ordered)


def _to_data(node: Node, issues: _Issues) -> Any:
    # Every scalar stays text: phone numbers, IDs and dates must not become ints or date objects.
    if isinstance(node, ScalarNode):
        return None if node.tag == "tag:yaml.org,2002:null" else node.value
    if isinstance(node, SequenceNode):
        seq = _Seq(_to_data(item, issues) for item in node.value)
        seq.line, seq.item_lines = _line(node), [_line(item) for item in node.value]
        return seq
    assert isinstance(node, MappingNode)
    mapping = _Map()
    mapping.line, mapping.key_lines = _line(node), {}
    for key_node, value_node in node.value:
        key = key_node.value if isinstance(key_node, ScalarNode) else None
        if key is None:
            issues.add(_line(key_node), "keys must be plain text")
        elif key in mapping:
            issues.add(_line(key_node), f"duplicate key '{key}' (first on line {mapping.key_lines[key]})")
        else:
            mapping[key] = _to_data(value_node, issues)
            mapping.key_lines[key] = _line(key_node)
    return mapping


# libyaml's loader when PyYAML was built with it: the pure-Python one took 2 s for the demo file.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _compose(text: str, issues: _Issues) -> Any:
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        issues.add(mark.line + 1 if mark else None, f"not valid YAML: {exc.problem or exc}")
        return None
    except yaml.YAMLError as exc:
        issues.add(None, f"not valid YAML: {exc}")
        return None
    return None if root is None else _to_data(root, issues)


# --- Field access helpers ---------------------------------------------------------------------------------


def _where(entry: _Map, key: str) -> int:
    return entry.key_lines.get(key, entry.line)


def _label(kind: str, entry: Any, index: int) -> str:
    if isinstance(entry, _Map) and isinstance(entry.get("id"), str):
        return f"{kind} '{entry['id']}'"
    return f"{kind} #{index + 1}"


class _Reader:
    """Reads one section entry: checks field names and types, reporting against the entry's lines."""

    def __init__(self, issues: _Issues, entry: _Map, label: str) -> None:
        self.issues, self.entry, self.label = issues, entry, label

    def error(self, key: str | None, message: str) -> None:
        line = _where(self.entry, key) if key else self.entry.line
        self.issues.add(line, f"{self.label}: {message}")

    def check_fields(self, required: Iterable[str], optional: Iterable[str]) -> bool:
        required, allowed = tuple(required), {*required, *optional}
        for key in self.entry:
            if key not in allowed:
                self.error(key, f"unknown field '{key}' (expected one of: {', '.join(sorted(allowed))})")
        missing = [k for k in required if self.entry.get(k) in (None, "")]
        for key in missing:
            self.error(None, f"missing required field '{key}'")
        return not missing

    def text(self, key: str) -> str | None:
        value = self.entry.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            self.error(key, f"'{key}' must be text")
            return None
        return value.strip() or None

    def texts(self, key: str) -> list[str]:
        value = self.entry.get(key)
        if value is None:
            return []
        if isinstance(value, str):
            return [value.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return [v.strip() for v in value]
        self.error(key, f"'{key}' must be text or a list of text")
        return []

    def mapping(self, key: str) -> _Map | None:
        value = self.entry.get(key)
        if value is None or isinstance(value, _Map):
            return value
        self.error(key, f"'{key}' must be a mapping")
        return None

    def entries(self, key: str) -> Iterator[tuple[Any, int]]:
        value = self.entry.get(key)
        if value is None:
            return
        if not isinstance(value, _Seq):
            self.error(key, f"'{key}' must be a list")
            return
        yield from zip(value, value.item_lines)


def _section(data: _Map, name: str, issues: _Issues) -> list[tuple[_Map, str]]:
    value = data.get(name)
    if value is None:
        return []
    if not isinstance(value, _Seq):
        issues.add(_where(data, name), f"'{name}' must be a list")
        return []
    kind = name.rstrip("s")
    result = []
    for index, (entry, line) in enumerate(zip(value, value.item_lines)):
        if isinstance(entry, _Map):
            result.append((entry, _label(kind, entry, index)))
        else:
            issues.add(line, f"{kind} #{index + 1}: expected a mapping with 'id', 'name', …")
    return result


def _valid_id(reader: _Reader) -> str | None:
    value = reader.text("id")
    if value is not None and not _FHIR_ID_RE.fullmatch(value):
        reader.error("id", f"id '{value}' is not a FHIR id (letters, digits, '-' and '.', at most 64)")
        return None
    return value


def _register(seen: dict[str, int], reader: _Reader, resource_id: str) -> bool:
    if resource_id in seen:
        reader.error("id", f"duplicate id '{resource_id}' (first on line {seen[resource_id]})")
        return False
    seen[resource_id] = _where(reader.entry, "id")
    return True


# --- FHIR building blocks ---------------------------------------------------------------------------------


def _reference(resource_type: str, resource_id: str, display: str | None) -> dict[str, Any]:
    ref: dict[str, Any] = {"reference": f"{resource_type}/{resource_id}"}
    if display:
        ref["display"] = display
    return ref


def _human_name(text: str) -> dict[str, Any]:
    name: dict[str, Any] = {"use": "official", "text": text}
    compact = text.replace(" ", "")
    # Split only plain Han names; transliterated names with a middle dot (阿依古丽·买买提) keep just the text.
    if len(compact) >= 2 and all("\u4e00" <= c <= "\u9fff" for c in compact):
        family = compact[:2] if compact[:2] in _COMPOUND_SURNAMES and len(compact) > 2 else compact[:1]
        name["family"], name["given"] = family, [compact[len(family) :]]
    return name


def _address(reader: _Reader, use: str) -> dict[str, Any] | None:
    value = reader.entry.get("address")
    if value is None:
        return None
    if isinstance(value, str):
        return {"use": use, "text": value.strip(), "country": "CN"}
    sub = reader.mapping("address")
    if sub is None:
        return None
    inner = _Reader(reader.issues, sub, f"{reader.label} address")
    if not inner.check_fields(["text"], ["province", "city", "district", "postal_code"]):
        return None
    address: dict[str, Any] = {"use": use, "text": inner.text("text")}
    for key, fhir_key in (("district", "district"), ("city", "city"), ("province", "state")):
        if part := inner.text(key):
            address[fhir_key] = part
    if postal := inner.text("postal_code"):
        address["postalCode"] = postal
    address["country"] = "CN"
    return address


def _phone(reader: _Reader, key: str, value: str) -> dict[str, Any] | None:
    if not _PHONE_RE.fullmatch(value):
        reader.error(key, f"'{value}' is not a phone number")
        return None
    use = "mobile" if _MOBILE_RE.fullmatch(value) else "work"
    return {"system": "phone", "value": value, "use": use}


def _telecom(reader: _Reader) -> list[dict[str, Any]]:
    sub = reader.mapping("telecom")
    if sub is None:
        return []
    inner = _Reader(reader.issues, sub, f"{reader.label} telecom")
    inner.check_fields([], ["phone", "email", "url"])
    points = [p for v in inner.texts("phone") if (p := _phone(inner, "phone", v))]
    points += [{"system": "email", "value": v, "use": "work"} for v in inner.texts("email")]
    points += [{"system": "url", "value": v, "use": "work"} for v in inner.texts("url")]
    return points


def _gender(reader: _Reader) -> str | None:
    value = reader.text("gender")
    if value is None:
        return None
    if value.lower() not in _GENDERS and value not in _GENDERS:
        reader.error("gender", f"unknown gender '{value}' (male, female, other, unknown, 男, 女)")
        return None
    return _GENDERS.get(value.lower(), _GENDERS.get(value))


def _coding(system: str, code: str, display: str) -> dict[str, str]:
    return {"system": system, "code": code, "display": display}


# --- Organizations ------------------------------------------------------------------------------------------

_ORG_FIELDS = (["id", "name", "level"], ["parent", "uscc", "address", "telecom", "alias"])


@dataclass
class _OrgEntry:
    reader: _Reader
    id: str
    name: str
    level: str | None
    parent: str | None
    uscc: str | None
    alias: list[str]
    telecom: list[dict[str, Any]]
    address: dict[str, Any] | None


def _read_organizations(data: _Map, issues: _Issues) -> dict[str, _OrgEntry]:
    orgs: dict[str, _OrgEntry] = {}
    seen: dict[str, int] = {}
    usccs: dict[str, int] = {}
    for entry, label in _section(data, "organizations", issues):
        reader = _Reader(issues, entry, label)
        complete = reader.check_fields(*_ORG_FIELDS)
        org_id = _valid_id(reader)
        level = _org_level(reader)
        uscc = _org_uscc(reader, level, usccs)
        alias, telecom, address = reader.texts("alias"), _telecom(reader), _address(reader, "work")
        if not complete or org_id is None or not _register(seen, reader, org_id):
            continue
        name, parent = reader.text("name") or "", reader.text("parent")
        orgs[org_id] = _OrgEntry(reader, org_id, name, level, parent, uscc, alias, telecom, address)
    return orgs


def _org_level(reader: _Reader) -> str | None:
    level = reader.text("level")
    if level is not None and level not in FACILITY_CODES:
        reader.error("level", f"unknown level '{level}' (expected one of: {', '.join(FACILITY_CODES)})")
        return None
    return level


def _org_uscc(reader: _Reader, level: str | None, seen: dict[str, int]) -> str | None:
    value = reader.text("uscc")
    if value is None:
        # Legal entities from the township center up always have a credit code; a village clinic may be
        # registered under its township center, and the centers are departments of the county hospital.
        facility = FACILITY_CODES.get(level or "")
        if facility and facility.kind == "tier" and (facility.rank or 0) >= 2:
            reader.error(None, "missing required field 'uscc' (统一社会信用代码)")
        return None
    uscc = normalize_uscc(value)
    if not is_valid_uscc(uscc):
        reader.error("uscc", f"invalid unified social credit code '{value}'{_uscc_hint(uscc)}")
        return None
    if uscc in seen:
        reader.error("uscc", f"unified social credit code {uscc} already used on line {seen[uscc]}")
        return None
    seen[uscc] = _where(reader.entry, "uscc")
    return uscc


def _uscc_hint(uscc: str) -> str:
    if len(uscc) != 18:
        return f" (18 characters expected, got {len(uscc)})"
    try:
        return f" (GB 32100 check character should be '{uscc_check_char(uscc[:17])}')"
    except ValueError:
        return " (characters outside the GB 32100 alphabet 0-9 A-H J-N P-R T U W-Y, or region not digits)"


def _check_tree(orgs: dict[str, _OrgEntry], issues: _Issues) -> None:
    for org in orgs.values():
        _check_parent(org, orgs)
    reported: set[str] = set()
    for org in orgs.values():
        cycle = _cycle_from(org.id, orgs)
        if cycle and not reported.intersection(cycle):
            reported.update(cycle)
            org.reader.error("parent", "parent cycle: " + " → ".join([*cycle, cycle[0]]))


def _check_parent(org: _OrgEntry, orgs: dict[str, _OrgEntry]) -> None:
    if org.parent is None:
        if org.level and not may_be_root(org.level):
            wanted = " or ".join(sorted(allowed_parent_codes(org.level)))
            org.reader.error(None, f"missing required field 'parent' (a {org.level} is part of a {wanted})")
        return
    parent = orgs.get(org.parent)
    if parent is None:
        org.reader.error("parent", f"unknown parent '{org.parent}'")
        return
    if org.level and parent.level and parent.level not in allowed_parent_codes(org.level):
        allowed = ", ".join(sorted(allowed_parent_codes(org.level))) or "none: it is the top of the tree"
        org.reader.error(
            "parent",
            f"a {org.level} cannot be part of '{parent.id}', a {parent.level} (allowed parent levels: {allowed})",
        )


def _cycle_from(start: str, orgs: dict[str, _OrgEntry]) -> list[str]:
    path: list[str] = []
    current: str | None = start
    while current is not None and current in orgs:
        if current in path:
            return path[path.index(current) :] if current == start else []
        path.append(current)
        current = orgs[current].parent
    return []


def _parent_first(orgs: dict[str, _OrgEntry]) -> list[_OrgEntry]:
    ordered: list[_OrgEntry] = []
    placed: set[str] = set()

    def place(org: _OrgEntry, visiting: frozenset[str]) -> None:
        if org.id in placed or org.id in visiting:
            return
        if org.parent in orgs:
            place(orgs[org.parent], visiting | {org.id})
        placed.add(org.id)
        ordered.append(org)

    for org in orgs.values():
        place(org, frozenset())
    return ordered


def _organization_resource(org: _OrgEntry, orgs: dict[str, _OrgEntry]) -> dict[str, Any]:
    facility = FACILITY_CODES[org.level or ""]
    # Centers are departments of the county hospital, not legal entities of their own.
    hl7_type = ("dept", "Hospital Department") if facility.kind != "tier" else ("prov", "Healthcare Provider")
    resource: dict[str, Any] = {"resourceType": "Organization", "id": org.id, "active": True}
    if org.uscc:
        resource["identifier"] = [
            {
                "use": "official",
                "type": {
                    "coding": [_coding(V2_IDENTIFIER_TYPE_SYSTEM, "XX", "Organization identifier")],
                    "text": "统一社会信用代码",
                },
                "system": USCC_SYSTEM,
                "value": org.uscc,
            }
        ]
    resource["type"] = [
        {
            "coding": [_coding(FACILITY_LEVEL_SYSTEM, facility.code, facility.display)],
            "text": facility.display,
        },
        {"coding": [_coding(ORGANIZATION_TYPE_SYSTEM, *hl7_type)]},
    ]
    resource["name"] = org.name
    if org.alias:
        resource["alias"] = org.alias
    if org.telecom:
        resource["telecom"] = org.telecom
    if org.address:
        resource["address"] = [org.address]
    if org.parent:
        resource["partOf"] = _reference("Organization", org.parent, orgs[org.parent].name)
    return resource


# --- Endpoints ------------------------------------------------------------------------------------------------

_ENDPOINT_FIELDS = (["id", "organization", "connection_type", "address"], ["name", "payload_mime_types"])


def _read_endpoints(
    data: _Map, orgs: dict[str, _OrgEntry], issues: _Issues, content: DirectoryContent
) -> None:
    seen: dict[str, int] = {}
    for entry, label in _section(data, "endpoints", issues):
        reader = _Reader(issues, entry, label)
        complete = reader.check_fields(*_ENDPOINT_FIELDS)
        endpoint_id = _valid_id(reader)
        org_id = _known_org(reader, "organization", orgs)
        connection = reader.text("connection_type")
        if connection is not None and connection not in CONNECTION_TYPES:
            known = ", ".join(CONNECTION_TYPES)
            reader.error(
                "connection_type", f"unknown connection_type '{connection}' (expected one of: {known})"
            )
            connection = None
        address = reader.text("address")
        if address is not None and "://" not in address:
            reader.error("address", f"address '{address}' is not a URL")
            address = None
        mime_types = reader.texts("payload_mime_types")
        if not complete or None in (endpoint_id, org_id, connection, address):
            continue
        if not _register(seen, reader, endpoint_id):
            continue
        resource = _endpoint_resource(reader, endpoint_id, orgs[org_id], connection, address, mime_types)
        content.endpoints.append(resource)
        content.lines[f"Endpoint/{endpoint_id}"] = entry.line


def _endpoint_resource(
    reader: _Reader, endpoint_id: str, org: _OrgEntry, connection: str, address: str, mime_types: list[str]
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Endpoint",
        "id": endpoint_id,
        "status": "active",
        "connectionType": _coding(
            ENDPOINT_CONNECTION_TYPE_SYSTEM, connection, CONNECTION_TYPES[connection][0]
        ),
    }
    if name := reader.text("name"):
        resource["name"] = name
    resource["managingOrganization"] = _reference("Organization", org.id, org.name)
    resource["payloadType"] = [{"coding": [_coding(ENDPOINT_PAYLOAD_TYPE_SYSTEM, "any", "Any")]}]
    if mimes := mime_types or list(CONNECTION_TYPES[connection][1]):
        resource["payloadMimeType"] = mimes
    resource["address"] = address
    return resource


def _known_org(reader: _Reader, key: str, orgs: dict[str, _OrgEntry]) -> str | None:
    org_id = reader.text(key)
    if org_id is not None and org_id not in orgs:
        reader.error(key, f"unknown organization '{org_id}'")
        return None
    return org_id


# --- Practitioners and their roles ------------------------------------------------------------------------

_PRACTITIONER_FIELDS = (
    ["id", "name", "organization", "roles"],
    ["gender", "title", "identifiers", "telecom"],
)
_ROLE_FIELDS = (["role"], ["specialty", "organization", "id"])


def _read_practitioners(
    data: _Map, orgs: dict[str, _OrgEntry], issues: _Issues, content: DirectoryContent
) -> None:
    seen: dict[str, int] = {}
    role_ids: dict[str, int] = {}
    for entry, label in _section(data, "practitioners", issues):
        reader = _Reader(issues, entry, label)
        complete = reader.check_fields(*_PRACTITIONER_FIELDS)
        practitioner_id = _valid_id(reader)
        org_id = _known_org(reader, "organization", orgs)
        gender = _gender(reader)
        title = _title(reader)
        identifiers = _practitioner_identifiers(reader)
        telecom = _telecom(reader)
        if not complete or practitioner_id is None or not _register(seen, reader, practitioner_id):
            continue
        name = reader.text("name") or ""
        resource = _practitioner_resource(practitioner_id, name, gender, title, identifiers, telecom)
        content.practitioners.append(resource)
        content.lines[f"Practitioner/{practitioner_id}"] = entry.line
        if org_id is None:
            continue
        for role, line in _roles(reader, practitioner_id, name, org_id, orgs, role_ids):
            content.practitioner_roles.append(role)
            content.lines[f"PractitionerRole/{role['id']}"] = line


def _title(reader: _Reader) -> ProfessionalTitle | None:
    value = reader.text("title")
    if value is None:
        return None
    code = _TITLE_ALIASES.get(value, value)
    by_display = {t.display: t for t in PROFESSIONAL_TITLES.values()}
    title = PROFESSIONAL_TITLES.get(code) or by_display.get(value)
    if title is None:
        reader.error(
            "title", f"unknown title '{value}' (e.g. 主任医师, 主治医师, 主管技师, 护师; or their codes)"
        )
    return title


def _practitioner_identifiers(reader: _Reader) -> list[dict[str, Any]]:
    identifiers = []
    for item, line in reader.entries("identifiers"):
        if not isinstance(item, _Map):
            reader.issues.add(line, f"{reader.label}: each identifier is a mapping with 'system' and 'value'")
            continue
        inner = _Reader(reader.issues, item, f"{reader.label} identifier")
        if not inner.check_fields(["system", "value"], []):
            continue
        system, value = inner.text("system") or "", inner.text("value") or ""
        if system == NATIONAL_ID_SYSTEM:
            value = normalize_national_id(value)
            if not is_valid_national_id(value):
                inner.error("value", f"invalid national ID '{value}'{_national_id_hint(value)}")
                continue
        identifiers.append({"system": system, "value": value})
    return identifiers


def _practitioner_resource(
    practitioner_id: str,
    name: str,
    gender: str | None,
    title: ProfessionalTitle | None,
    identifiers: list[dict[str, Any]],
    telecom: list[dict[str, Any]],
) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "Practitioner", "id": practitioner_id, "active": True}
    if identifiers:
        resource["identifier"] = identifiers
    resource["name"] = [_human_name(name)]
    if telecom:
        resource["telecom"] = telecom
    if gender:
        resource["gender"] = gender
    if title:
        coding = _coding(PROFESSIONAL_TITLE_SYSTEM, title.code, title.display)
        resource["qualification"] = [{"code": {"coding": [coding], "text": title.display}}]
    return resource


def _roles(
    reader: _Reader,
    practitioner_id: str,
    practitioner_name: str,
    main_org: str,
    orgs: dict[str, _OrgEntry],
    seen: dict[str, int],
) -> Iterator[tuple[dict[str, Any], int]]:
    for item, line in reader.entries("roles"):
        role = _role_entry(reader, item, line, orgs)
        if role is None:
            continue
        code, specialty, org_id, explicit_id = role
        org_id = org_id or main_org
        # The id is derived, so the same file always yields the same PractitionerRole ids.
        role_id = explicit_id or "-".join(
            [practitioner_id, code.code] + ([org_id] if org_id != main_org else [])
        )
        if not _FHIR_ID_RE.fullmatch(role_id):
            reader.issues.add(
                line, f"{reader.label}: role id '{role_id}' is longer than 64; give the role an 'id'"
            )
            continue
        if role_id in seen:
            reader.issues.add(
                line, f"{reader.label}: duplicate role id '{role_id}' (first on line {seen[role_id]})"
            )
            continue
        seen[role_id] = line
        practitioner = _reference("Practitioner", practitioner_id, practitioner_name)
        yield _practitioner_role_resource(role_id, practitioner, orgs[org_id], code, specialty), line


def _role_entry(
    reader: _Reader, item: Any, line: int, orgs: dict[str, _OrgEntry]
) -> tuple[RoleCode, str | None, str | None, str | None] | None:
    if isinstance(item, str):
        item_map = _Map(role=item)
        item_map.line, item_map.key_lines = line, {"role": line}
        item = item_map
    if not isinstance(item, _Map):
        reader.issues.add(line, f"{reader.label}: each role is a code or a mapping with 'role'")
        return None
    inner = _Reader(reader.issues, item, reader.label)
    if not inner.check_fields(*_ROLE_FIELDS):
        return None
    code = inner.text("role") or ""
    if code not in PRACTITIONER_ROLES:
        inner.error("role", f"unknown role '{code}' (expected one of: {', '.join(PRACTITIONER_ROLES)})")
        return None
    specialty = inner.text("specialty")
    by_display = {display: code for code, display in SPECIALTIES.items()}
    if specialty is not None and specialty not in SPECIALTIES:
        if specialty not in by_display:
            inner.error(
                "specialty", f"unknown specialty '{specialty}' (see SPECIALTIES, e.g. cardiology, radiology)"
            )
            return None
        specialty = by_display[specialty]
    org_id = _known_org(inner, "organization", orgs) if "organization" in item else None
    if "organization" in item and org_id is None:
        return None
    role_id = inner.text("id")
    if role_id is not None and not _FHIR_ID_RE.fullmatch(role_id):
        inner.error("id", f"id '{role_id}' is not a FHIR id")
        return None
    return PRACTITIONER_ROLES[code], specialty, org_id, role_id


def _practitioner_role_resource(
    role_id: str, practitioner: dict[str, Any], org: _OrgEntry, role: RoleCode, specialty: str | None
) -> dict[str, Any]:
    codings = [_coding(PRACTITIONER_ROLE_SYSTEM, role.code, role.display)]
    if role.hl7:
        codings.append(_coding(HL7_PRACTITIONER_ROLE_SYSTEM, *role.hl7))
    resource: dict[str, Any] = {
        "resourceType": "PractitionerRole",
        "id": role_id,
        "active": True,
        "practitioner": practitioner,
        "organization": _reference("Organization", org.id, org.name),
        "code": [{"coding": codings, "text": role.display}],
    }
    if specialty:
        display = SPECIALTIES[specialty]
        resource["specialty"] = [{"coding": [_coding(SPECIALTY_SYSTEM, specialty, display)], "text": display}]
    return resource


# --- Patients -----------------------------------------------------------------------------------------------

_PATIENT_FIELDS = (["id", "name"], ["gender", "birth_date", "national_id", "phone", "address", "mrns"])


def _read_patients(
    data: _Map, orgs: dict[str, _OrgEntry], issues: _Issues, content: DirectoryContent
) -> None:
    seen: dict[str, int] = {}
    national_ids: dict[str, int] = {}
    mrns: dict[tuple[str, str], int] = {}
    for entry, label in _section(data, "patients", issues):
        reader = _Reader(issues, entry, label)
        complete = reader.check_fields(*_PATIENT_FIELDS)
        patient_id = _valid_id(reader)
        national_id = _patient_national_id(reader, national_ids)
        gender, birth_date = _patient_demographics(reader, national_id)
        identifiers = _patient_mrns(reader, orgs, mrns)
        phone = reader.text("phone")
        telecom = _phone(reader, "phone", phone) if phone else None
        address = _address(reader, "home")
        if not complete or patient_id is None or not _register(seen, reader, patient_id):
            continue
        resource: dict[str, Any] = {"resourceType": "Patient", "id": patient_id, "active": True}
        resource["identifier"] = ([_national_id_identifier(national_id)] if national_id else []) + identifiers
        if not resource["identifier"]:
            del resource["identifier"]
        resource["name"] = [_human_name(reader.text("name") or "")]
        if telecom:
            resource["telecom"] = [telecom]
        if gender:
            resource["gender"] = gender
        if birth_date:
            resource["birthDate"] = birth_date
        if address:
            resource["address"] = [address]
        content.patients.append(resource)
        content.lines[f"Patient/{patient_id}"] = entry.line


def _patient_national_id(reader: _Reader, seen: dict[str, int]) -> str | None:
    value = reader.text("national_id")
    if value is None:
        return None
    # Files come from spreadsheets where a trailing lower-case x is common; store the canonical form.
    national_id = normalize_national_id(value)
    if not is_valid_national_id(national_id):
        reader.error("national_id", f"invalid national ID '{value}'{_national_id_hint(national_id)}")
        return None
    if national_id in seen:
        reader.error(
            "national_id",
            f"national ID {national_id} already belongs to the patient on line "
            f"{seen[national_id]} (one Patient per person)",
        )
        return None
    seen[national_id] = _where(reader.entry, "national_id")
    return national_id


def _national_id_hint(value: str) -> str:
    if len(value) != 18:
        return f" (18 characters expected, got {len(value)})"
    if not value[:17].isdigit() or not (value[17].isdigit() or value[17] == "X"):
        return " (17 digits and a check character 0-9 or X expected)"
    if national_id_birth_date(value) is None:
        return f" (birth date {value[6:14]} is not a real date)"
    if value[0] == "0":
        return " (region code cannot start with 0)"
    return f" (GB 11643 check character should be '{national_id_check_char(value[:17])}')"


def _patient_demographics(reader: _Reader, national_id: str | None) -> tuple[str | None, str | None]:
    gender = _gender(reader)
    birth_date = reader.text("birth_date")
    if birth_date is not None and not _is_date(birth_date):
        reader.error("birth_date", f"birth_date '{birth_date}' is not a date (YYYY-MM-DD)")
        birth_date = None
    if national_id is None:
        if "national_id" in reader.entry:
            return gender, birth_date  # already reported as invalid; demanding more fields would be noise
        for key, value in (("gender", gender), ("birth_date", birth_date)):
            if value is None and key not in reader.entry:
                reader.error(None, f"missing required field '{key}' (needed when there is no national_id)")
        return gender, birth_date
    # The ID encodes both; the file may omit them, but must not contradict them.
    id_birth, id_gender = national_id_birth_date(national_id).isoformat(), national_id_gender(national_id)
    if birth_date is not None and birth_date != id_birth:
        reader.error("birth_date", f"birth_date {birth_date} does not match national ID (born {id_birth})")
    if gender is not None and gender != id_gender:
        reader.error("gender", f"gender {gender} does not match national ID (17th digit says {id_gender})")
    return gender or id_gender, birth_date or id_birth


def _is_date(value: str) -> bool:
    if not _DATE_RE.fullmatch(value):
        return False
    try:
        date.fromisoformat(value)
    except ValueError:
        return False
    return True


def _patient_mrns(
    reader: _Reader, orgs: dict[str, _OrgEntry], seen: dict[tuple[str, str], int]
) -> list[dict[str, Any]]:
    identifiers = []
    for item, line in reader.entries("mrns"):
        if not isinstance(item, _Map):
            reader.issues.add(line, f"{reader.label}: each MRN is a mapping with 'organization' and 'value'")
            continue
        inner = _Reader(reader.issues, item, reader.label)
        if not inner.check_fields(["organization", "value"], []):
            continue
        org_id, value = inner.text("organization") or "", inner.text("value") or ""
        if org_id not in orgs:
            inner.error("organization", f"MRN at unknown organization '{org_id}'")
            continue
        if (org_id, value) in seen:
            inner.error("value", f"MRN {value} at '{org_id}' already used on line {seen[org_id, value]}")
            continue
        seen[org_id, value] = line
        identifiers.append(_mrn_identifier(orgs[org_id], value))
    return identifiers


def _national_id_identifier(national_id: str) -> dict[str, Any]:
    return {
        "use": "official",
        "type": {
            "coding": [_coding(V2_IDENTIFIER_TYPE_SYSTEM, "NI", "National unique individual identifier")],
            "text": "居民身份证",
        },
        "system": NATIONAL_ID_SYSTEM,
        "value": national_id,
    }


def _mrn_identifier(org: _OrgEntry, value: str) -> dict[str, Any]:
    return {
        "use": "usual",
        "type": {
            "coding": [_coding(V2_IDENTIFIER_TYPE_SYSTEM, "MR", "Medical record number")],
            "text": "病历号",
        },
        "system": mrn_system(org.id),
        "value": value,
        "assigner": _reference("Organization", org.id, org.name),
    }


# --- Entry point --------------------------------------------------------------------------------------------

_TOP_LEVEL = ("alliance", "organizations", "endpoints", "practitioners", "patients")


def parse_directory_file(path: str | Path) -> DirectoryContent:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DirectoryFileError(f"cannot read the directory file: {exc}", path=path) from exc
    return parse_directory_text(text, source=str(path))


def parse_directory_text(text: str, source: str | None = None) -> DirectoryContent:
    issues = _Issues(source)
    data = _compose(text, issues)
    issues.raise_if_any()
    if not isinstance(data, _Map):
        raise DirectoryFileError("the file must be a mapping with 'alliance' and 'organizations'", 1, source)
    content = _read_all(data, issues)
    issues.raise_if_any()
    return content


def _read_all(data: _Map, issues: _Issues) -> DirectoryContent:
    for key in data:
        if key not in _TOP_LEVEL:
            issues.add(
                _where(data, key), f"unknown top-level key '{key}' (expected: {', '.join(_TOP_LEVEL)})"
            )
    alliance = data.get("alliance")
    if not isinstance(alliance, str) or not alliance.strip():
        issues.add(_where(data, "alliance"), "missing required field 'alliance' (the alliance's name)")
        alliance = ""
    content = DirectoryContent(alliance=alliance.strip(), source=issues.path)
    orgs = _read_organizations(data, issues)
    _check_tree(orgs, issues)
    if not issues.items:
        for org in _parent_first(orgs):
            content.organizations.append(_organization_resource(org, orgs))
            content.lines[f"Organization/{org.id}"] = org.reader.entry.line
    _read_endpoints(data, orgs, issues, content)
    _read_practitioners(data, orgs, issues, content)
    _read_patients(data, orgs, issues, content)
    return content

"""Writes services/directory/src/directory/demo/alliance.yaml, the demo alliance loaded by `make run`.

Deterministic: a fixed seed and no clock, so running it again gives the same file byte for byte.
Run: .venv/bin/python scripts/generate_demo_alliance.py [--check]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "services" / "directory" / "src"))

from directory.directory_file import parse_directory_file  # noqa: E402 - after the sys.path entry
from directory.identifiers import (  # noqa: E402
    PRACTITIONER_LICENSE_SYSTEM,
    USCC_ALPHABET,
    national_id_check_char,
    uscc_check_char,
)

OUTPUT = REPO / "services" / "directory" / "src" / "directory" / "demo" / "alliance.yaml"
SEED = 20250101
PATIENT_COUNT = 240

PROVINCE, CITY, COUNTY = "浙江省", "衢州市", "青溪县"
# 青溪县 is fictional; 330829 is a code no real county of 衢州市 uses.
COUNTY_REGION = "330829"
NEIGHBOUR_REGIONS = ("330802", "330803", "330881", "330822")  # 柯城区, 衢江区, 江山市, 常山县
AREA_CODE = "0570"

TOWNSHIPS: list[tuple[str, str, str, list[tuple[str, str]]]] = [
    # (id suffix, 镇, MRN prefix, villages as (id suffix, 村))
    ("xikou", "溪口镇", "XK", [("shangwu", "上坞村"), ("xiayang", "下洋村"), ("houtang", "后塘村")]),
    ("shimen", "石门镇", "SM", [("shimen", "石门村"), ("qinglong", "青龙村"), ("lingjiao", "岭脚村")]),
    ("baisha", "白沙镇", "BS", [("baisha", "白沙村"), ("shawan", "沙湾村"), ("dongao", "东岙村")]),
    ("tongxi", "桐溪镇", "TX", [("tongxi", "桐溪村"), ("panjia", "潘家村"), ("gaoping", "高坪村")]),
    ("yunfeng", "云峰镇", "YF", [("yunfeng", "云峰村"), ("chayuan", "茶园村"), ("zhukeng", "竹坑村")]),
    (
        "huangtang",
        "黄塘镇",
        "HT",
        [("huangtang", "黄塘村"), ("xindian", "新店村"), ("yangmeiling", "杨梅岭村")],
    ),
    ("fenglin", "枫林镇", "FL", [("fenglin", "枫林村"), ("xujiawu", "徐家坞村"), ("daping", "大坪村")]),
    ("shuanggang", "双港镇", "SG", [("shuanggang", "双港村"), ("jiangkou", "江口村"), ("tangtou", "塘头村")]),
    ("meiling", "梅岭镇", "ML", [("meiling", "梅岭村"), ("xiazhuang", "下庄村"), ("yanqian", "岩前村")]),
    ("longtan", "龙潭镇", "LT", [("longtan", "龙潭村"), ("xidong", "溪东村"), ("zhangcun", "章村")]),
]
STREETS = ("解放路", "人民路", "中山路", "新华街", "文化路", "健康路", "府前街", "建设路")

PROVINCIAL = "zhejiang-tongren-hospital"
CITY_HOSPITAL = "quzhou-central-hospital"
COUNTY_HOSPITAL = "qingxi-county-hospital"
CENTERS = [
    # (id, level, name)
    ("qingxi-lab-center", "lab-center", "青溪县医学检验中心"),
    ("qingxi-imaging-center", "imaging-center", "青溪县医学影像中心"),
    ("qingxi-ecg-center", "ecg-center", "青溪县心电诊断中心"),
    ("qingxi-pathology-center", "pathology-center", "青溪县病理诊断中心"),
    ("qingxi-sterile-supply-center", "sterile-supply-center", "青溪县消毒供应中心"),
    ("qingxi-chest-pain-center", "chest-pain-center", "青溪县人民医院胸痛中心"),
    ("qingxi-stroke-center", "stroke-center", "青溪县人民医院卒中中心"),
    ("qingxi-trauma-center", "trauma-center", "青溪县人民医院创伤中心"),
    ("qingxi-critical-maternal-center", "critical-maternal-center", "青溪县危重孕产妇救治中心"),
    ("qingxi-critical-neonatal-center", "critical-neonatal-center", "青溪县危重儿童和新生儿救治中心"),
]

CENTER_GROUP_COMMENTS = {
    "lab-center": "五大资源共享中心：医学检验、医学影像、心电诊断、病理、消毒供应",
    "chest-pain-center": "五大急救中心（绿色通道）：胸痛、卒中、创伤、危重孕产妇、危重儿童和新生儿",
}

# Surnames common in western Zhejiang come first and are drawn more often.
LOCAL_SURNAMES = "徐王毛余祝郑姜汪方吴叶周"
SURNAMES = LOCAL_SURNAMES * 3 + "刘陈张李杨金黄胡朱何林郭程童邵傅赵孙马高罗梁宋唐许韩冯邓曹彭曾田董潘袁蔡蒋杜"
COMPOUND_SURNAMES = ("欧阳", "诸葛", "上官")
GIVEN = {
    # (gender, generation) → characters; two-character names draw two of them.
    ("male", "old"): "根土发财福水林有金荣德兴宝和顺春明炳松",
    ("male", "mid"): "建国军平华明伟强勇斌刚峰海东志文红卫忠",
    ("male", "young"): "浩宇轩涛杰鹏磊超俊晨博睿辰航鑫皓逸然泽",
    ("female", "old"): "菊凤兰英秀珍花桂香娥梅莲彩月娣翠玉仙",
    ("female", "mid"): "芳娟敏静丽艳霞燕玲红萍琴莉慧洁华群雪",
    ("female", "young"): "婷欣怡琳悦雅涵萱诺彤佳颖妍琪瑶梓蕊晴",
}


@dataclass
class Org:
    id: str
    name: str
    level: str
    parent: str | None
    uscc: str | None
    address: dict[str, str] | None
    phone: str | None = None
    alias: list[str] = field(default_factory=list)
    comment: str | None = None


@dataclass
class Role:
    role: str
    specialty: str | None = None
    organization: str | None = None


@dataclass
class Practitioner:
    id: str
    name: str
    gender: str
    organization: str
    title: str | None
    roles: list[Role]
    license: str | None = None


@dataclass
class Patient:
    id: str
    name: str
    gender: str
    birth_date: date
    national_id: str
    phone: str
    address: str
    mrns: list[tuple[str, str]]


# --- identifiers --------------------------------------------------------------------------------------------


def org_code(rng: random.Random, first: str) -> str:
    """A 9-character GB 11714 organization code: 8 characters and their MOD 11 check character."""
    body = first + "".join(rng.choice("0123456789") for _ in range(7))
    values = [int(c) if c.isdigit() else ord(c) - 55 for c in body]
    check = 11 - sum(v * w for v, w in zip(values, (3, 7, 9, 10, 5, 8, 4, 2))) % 11
    return body + {10: "X", 11: "0"}.get(check, str(check))


def uscc(rng: random.Random, authority: str, region: str, first: str = "4") -> str:
    # Public hospitals are 事业单位 registered with 机构编制 (authority "12"); village clinics here are
    # 民办非企业单位 (authority "52") whose codes start with "MJ".
    if authority == "52":
        body = "MJ" + "".join(rng.choice(USCC_ALPHABET) for _ in range(7))
    else:
        body = org_code(rng, first)
    first17 = authority + region + body
    return first17 + uscc_check_char(first17)


def national_id(rng: random.Random, region: str, born: date, gender: str, used: set[str]) -> str:
    while True:
        sequence = rng.randrange(0, 100) * 10 + rng.choice(
            (1, 3, 5, 7, 9) if gender == "male" else (0, 2, 4, 6, 8)
        )
        first17 = f"{region}{born:%Y%m%d}{sequence:03d}"
        value = first17 + national_id_check_char(first17)
        if value not in used:
            used.add(value)
            return value


def mobile(rng: random.Random) -> str:
    return "1" + rng.choice("35789") + "".join(rng.choice("0123456789") for _ in range(9))


def license_number(rng: random.Random) -> str:
    # 医师执业证书编码 are 15 digits.
    return "1" + "".join(rng.choice("0123456789") for _ in range(14))


def chinese_name(rng: random.Random, gender: str, born_year: int) -> str:
    generation = "old" if born_year < 1960 else "mid" if born_year < 1990 else "young"
    surname = rng.choice(COMPOUND_SURNAMES) if rng.random() < 0.02 else rng.choice(SURNAMES)
    pool = GIVEN[gender, generation]
    given = rng.choice(pool) if rng.random() < 0.3 else rng.choice(pool) + rng.choice(pool)
    return surname + given


# --- organizations ------------------------------------------------------------------------------------------


def county_address(place: str) -> dict[str, str]:
    return {
        "text": f"{PROVINCE}{CITY}{COUNTY}{place}",
        "province": PROVINCE,
        "city": CITY,
        "district": COUNTY,
    }


def organizations(rng: random.Random) -> list[Org]:
    orgs = [
        Org(
            PROVINCIAL,
            "浙江省立同仁医院",
            "provincial-hospital",
            None,
            uscc(rng, "12", "330000"),
            {
                "text": "浙江省杭州市拱墅区同仁路1号",
                "province": PROVINCE,
                "city": "杭州市",
                "district": "拱墅区",
            },
            "0571-87000120",
            comment="上级合作医院（省级）",
        ),
        Org(
            CITY_HOSPITAL,
            "衢州市中心医院",
            "city-hospital",
            PROVINCIAL,
            uscc(rng, "12", "330800"),
            {
                "text": "浙江省衢州市柯城区钟楼底街100号",
                "province": PROVINCE,
                "city": CITY,
                "district": "柯城区",
            },
            "0570-3020120",
            comment="上级合作医院（市级）",
        ),
        Org(
            COUNTY_HOSPITAL,
            "青溪县人民医院",
            "county-hospital",
            CITY_HOSPITAL,
            uscc(rng, "12", COUNTY_REGION),
            county_address("城关镇人民路88号"),
            "0570-7012120",
            ["青溪县医疗健康集团总院"],
            comment="牵头医院",
        ),
    ]
    for center_id, level, name in CENTERS:
        # Centers are departments inside the county hospital: no credit code or address of their own.
        comment = CENTER_GROUP_COMMENTS.get(level)
        orgs.append(Org(center_id, name, level, COUNTY_HOSPITAL, None, None, comment=comment))
    for suffix, town, _, villages in TOWNSHIPS:
        thc = f"thc-{suffix}"
        address = county_address(f"{town}{rng.choice(STREETS)}{rng.randint(1, 99)}号")
        orgs.append(
            Org(
                thc,
                f"{COUNTY}{town}中心卫生院",
                "township-health-center",
                COUNTY_HOSPITAL,
                uscc(rng, "12", COUNTY_REGION),
                address,
                f"{AREA_CODE}-70{rng.randint(10000, 99999)}",
                [f"{town}卫生院"],
                comment=f"{town}：中心卫生院及其村卫生室",
            )
        )
        for village_suffix, village in villages:
            orgs.append(
                Org(
                    f"vc-{suffix}-{village_suffix}",
                    f"{COUNTY}{town}{village}卫生室",
                    "village-clinic",
                    thc,
                    uscc(rng, "52", COUNTY_REGION),
                    county_address(f"{town}{village}"),
                )
            )
    return orgs


# --- practitioners ------------------------------------------------------------------------------------------

# (organization, id prefix, [(title, role, specialty)])
UPPER_STAFF = [
    (
        PROVINCIAL,
        "prov",
        [
            ("主任医师", "doctor", "cardiology"),
            ("主任医师", "doctor", "neurology"),
            ("主任医师", "doctor", "radiology"),
            ("副主任医师", "doctor", "pathology"),
            ("主任医师", "doctor", "obstetrics"),
        ],
    ),
    (
        CITY_HOSPITAL,
        "city",
        [
            ("主任医师", "doctor", "cardiology"),
            ("主任医师", "doctor", "general-surgery"),
            ("副主任医师", "doctor", "radiology"),
            ("副主任医师", "doctor", "neonatology"),
            ("主治医师", "doctor", "ecg-diagnosis"),
        ],
    ),
    (
        COUNTY_HOSPITAL,
        "county",
        [
            ("主任医师", "doctor", "internal-medicine"),
            ("副主任医师", "doctor", "cardiology"),
            ("副主任医师", "doctor", "general-surgery"),
            ("主治医师", "doctor", "emergency-medicine"),
            ("主治医师", "doctor", "obstetrics"),
            ("住院医师", "doctor", "internal-medicine"),
            ("主管护师", "nurse", "nursing"),
            ("护师", "nurse", "nursing"),
            ("主管药师", "pharmacist", "pharmacy"),
        ],
    ),
    (
        "qingxi-imaging-center",
        "imaging",
        [
            ("副主任医师", "doctor", "radiology"),
            ("主治医师", "doctor", "radiology"),
            ("住院医师", "doctor", "radiology"),
            ("主治医师", "doctor", "ultrasound"),
            ("主管技师", "technician", "radiology"),
            ("技师", "technician", "radiology"),
        ],
    ),
    (
        "qingxi-ecg-center",
        "ecg",
        [
            ("主治医师", "doctor", "ecg-diagnosis"),
            ("主治医师", "doctor", "ecg-diagnosis"),
            ("住院医师", "doctor", "ecg-diagnosis"),
            ("技师", "technician", "ecg-diagnosis"),
        ],
    ),
    (
        "qingxi-lab-center",
        "lab",
        [
            ("副主任技师", "technician", "laboratory-medicine"),
            ("主管技师", "technician", "laboratory-medicine"),
            ("技师", "technician", "laboratory-medicine"),
        ],
    ),
    (
        "qingxi-pathology-center",
        "pathology",
        [
            ("副主任医师", "doctor", "pathology"),
            ("主治医师", "doctor", "pathology"),
            ("技师", "technician", "pathology"),
        ],
    ),
    (
        "qingxi-sterile-supply-center",
        "cssd",
        [
            ("主管护师", "nurse", "sterile-supply"),
            ("护师", "nurse", "sterile-supply"),
        ],
    ),
    ("qingxi-chest-pain-center", "chestpain", [("主治医师", "doctor", "cardiology")]),
    (
        "qingxi-stroke-center",
        "stroke",
        [("副主任医师", "doctor", "neurology"), ("主治医师", "doctor", "neurology")],
    ),
    (
        "qingxi-trauma-center",
        "trauma",
        [("副主任医师", "doctor", "orthopedics"), ("主治医师", "doctor", "neurosurgery")],
    ),
    (
        "qingxi-critical-maternal-center",
        "maternal",
        [("副主任医师", "doctor", "obstetrics"), ("主管护师", "nurse", "obstetrics")],
    ),
    (
        "qingxi-critical-neonatal-center",
        "neonatal",
        [("主治医师", "doctor", "neonatology"), ("副主任医师", "doctor", "pediatrics")],
    ),
]
TOWNSHIP_STAFF = [
    [
        ("主治医师", "doctor", "general-practice"),
        ("住院医师", "doctor", "traditional-chinese-medicine"),
        ("护师", "nurse", "nursing"),
    ],
    [
        ("主治医师", "doctor", "general-practice"),
        ("医士", "doctor", "general-practice"),
        ("主管护师", "nurse", "nursing"),
        ("技师", "technician", "ultrasound"),
    ],
]
# County doctors who also sit at another site (多点执业 / 下沉坐诊): (staff index at the county hospital, org, specialty)
EXTRA_SITES = [
    (1, "qingxi-chest-pain-center", "cardiology"),
    (0, "thc-xikou", "internal-medicine"),
    (4, "qingxi-critical-maternal-center", "obstetrics"),
]


def staff_member(
    rng: random.Random, pid: str, org: str, title: str | None, roles: list[Role]
) -> Practitioner:
    gender = "female" if roles[0].role == "nurse" and rng.random() < 0.9 else rng.choice(("male", "female"))
    name = chinese_name(rng, gender, rng.randint(1965, 1995))
    license = license_number(rng) if roles[0].role == "doctor" else None
    return Practitioner(pid, name, gender, org, title, roles, license)


def practitioners(rng: random.Random) -> list[Practitioner]:
    staff: list[Practitioner] = []
    for org, prefix, members in UPPER_STAFF:
        for n, (title, role, specialty) in enumerate(members, 1):
            staff.append(staff_member(rng, f"prac-{prefix}-{n:02d}", org, title, [Role(role, specialty)]))
    county = [p for p in staff if p.organization == COUNTY_HOSPITAL]
    for index, org, specialty in EXTRA_SITES:
        county[index].roles.append(Role("doctor", specialty, org))
    for t, (suffix, _, _, villages) in enumerate(TOWNSHIPS):
        for n, (title, role, specialty) in enumerate(TOWNSHIP_STAFF[t % 2], 1):
            staff.append(
                staff_member(rng, f"prac-{suffix}-{n}", f"thc-{suffix}", title, [Role(role, specialty)])
            )
        for village_suffix, _ in villages:
            # Most 乡村医生 hold no professional title; some passed the 执业助理医师 exam and are 医士.
            title = "医士" if rng.random() < 0.3 else None
            pid = f"prac-{suffix}-{village_suffix}"
            roles = [Role("village-doctor", "general-practice")]
            staff.append(staff_member(rng, pid, f"vc-{suffix}-{village_suffix}", title, roles))
    return staff


# --- patients ----------------------------------------------------------------------------------------------


def birth_date(rng: random.Random) -> date:
    # Rural townships are old: half the patients are over 60.
    start, end = rng.choices(
        [(1932, 1960), (1960, 1980), (1980, 2005), (2005, 2024)], weights=(35, 30, 22, 13)
    )[0]
    first = date(start, 1, 1)
    return first + timedelta(days=rng.randrange((date(end, 12, 31) - first).days))


def patients(rng: random.Random) -> list[Patient]:
    used_ids: set[str] = set()
    mrn_counters = {COUNTY_HOSPITAL: 20_000_000, CITY_HOSPITAL: 3_100_000_000, PROVINCIAL: 880_000}
    mrn_counters.update({f"thc-{t[0]}": 0 for t in TOWNSHIPS})
    result = []
    for n in range(1, PATIENT_COUNT + 1):
        suffix, town, prefix, villages = rng.choice(TOWNSHIPS)
        gender = rng.choice(("male", "female"))
        born = birth_date(rng)
        region = COUNTY_REGION if rng.random() < 0.9 else rng.choice(NEIGHBOUR_REGIONS)
        village = rng.choice(villages)[1]
        address = f"{PROVINCE}{CITY}{COUNTY}{town}{village}{rng.randint(1, 120)}号"
        visited = visits(rng, f"thc-{suffix}")
        mrns = []
        for org in visited:
            mrn_counters[org] += rng.randint(1, 400)
            mrns.append((org, mrn_value(org, prefix, mrn_counters[org])))
        result.append(
            Patient(
                f"pat-{n:04d}",
                chinese_name(rng, gender, born.year),
                gender,
                born,
                national_id(rng, region, born, gender, used_ids),
                mobile(rng),
                address,
                mrns,
            )
        )
    return result


def visits(rng: random.Random, township: str) -> list[str]:
    visited = [
        org
        for org, p in ((township, 0.75), (COUNTY_HOSPITAL, 0.55), (CITY_HOSPITAL, 0.08), (PROVINCIAL, 0.03))
        if rng.random() < p
    ]
    return visited or [township]


def mrn_value(org: str, township_prefix: str, counter: int) -> str:
    # Each HIS numbers its records its own way; that is why MRNs need per-hospital systems.
    if org == COUNTY_HOSPITAL:
        return f"{counter:08d}"
    if org == CITY_HOSPITAL:
        return f"{counter:010d}"
    if org == PROVINCIAL:
        return f"ZJ{counter:07d}"
    return f"{township_prefix}{counter:06d}"


# --- endpoints --------------------------------------------------------------------------------------------------

ENDPOINTS = [
    (
        "ep-qingxi-pacs-wado",
        "qingxi-imaging-center",
        "dicom-wado-rs",
        "https://pacs.qingxi-yjt.example/dicom-web",
        "青溪县医学影像中心 PACS（WADO-RS 取图）",
    ),
    (
        "ep-qingxi-pacs-qido",
        "qingxi-imaging-center",
        "dicom-qido-rs",
        "https://pacs.qingxi-yjt.example/dicom-web",
        "青溪县医学影像中心 PACS（QIDO-RS 检索）",
    ),
    (
        "ep-qingxi-pacs-fhir",
        "qingxi-imaging-center",
        "hl7-fhir-rest",
        "https://pacs.qingxi-yjt.example/fhir",
        "青溪县医学影像中心 FHIR 接口（ImagingStudy）",
    ),
    (
        "ep-qingxi-his-fhir",
        COUNTY_HOSPITAL,
        "hl7-fhir-rest",
        "https://his.qingxi-yjt.example/fhir",
        "青溪县人民医院 HIS FHIR 接口",
    ),
    (
        "ep-quzhou-pacs-wado",
        CITY_HOSPITAL,
        "dicom-wado-rs",
        "https://pacs.quzhou-central.example/dicom-web",
        "衢州市中心医院 PACS（WADO-RS 取图）",
    ),
]


# --- YAML writing --------------------------------------------------------------------------------------------


def q(value: str) -> str:
    # Identifiers are quoted so that any YAML reader keeps them as text (leading zeros, all-digit values).
    return json.dumps(value, ensure_ascii=False)


HEADER = f"""\
# 青溪县医疗健康集团（县域医共体）演示目录 — demo directory of a county medical alliance.
#
# Generated by scripts/generate_demo_alliance.py (seed {SEED}); edit the script, not this file.
# Format: docs/directory-file.md. Everything here is fictional: 青溪县 (region code {COUNTY_REGION}) does not
# exist, and the credit codes, national IDs, licence numbers and phone numbers are synthetic, made valid
# by their check characters only.
#
# Tree (Organization.partOf points up):
#   省级医院 ← 市级医院 ← 县医院（牵头医院）← 乡镇卫生院 ← 村卫生室
#   the five shared centers and five emergency centers are partOf the county hospital.

alliance: 青溪县医疗健康集团
"""


def org_lines(org: Org) -> list[str]:
    lines = [f"  # {org.comment}"] if org.comment else []
    lines += [f"  - id: {org.id}", f"    name: {org.name}", f"    level: {org.level}"]
    if org.parent:
        lines.append(f"    parent: {org.parent}")
    if org.uscc:
        lines.append(f"    uscc: {q(org.uscc)}")
    if org.alias:
        lines.append(f"    alias: [{', '.join(org.alias)}]")
    if org.address:
        parts = ", ".join(f"{key}: {value}" for key, value in org.address.items())
        lines.append(f"    address: {{{parts}}}")
    if org.phone:
        lines.append(f"    telecom: {{phone: {q(org.phone)}}}")
    return lines


def practitioner_lines(p: Practitioner) -> list[str]:
    lines = [
        f"  - id: {p.id}",
        f"    name: {p.name}",
        f"    gender: {p.gender}",
        f"    organization: {p.organization}",
    ]
    if p.title:
        lines.append(f"    title: {p.title}")
    lines.append("    roles:")
    for r in p.roles:
        parts = [f"role: {r.role}"] + ([f"specialty: {r.specialty}"] if r.specialty else [])
        parts += [f"organization: {r.organization}"] if r.organization else []
        lines.append(f"      - {{{', '.join(parts)}}}")
    if p.license:
        license_line = f"      - {{system: {PRACTITIONER_LICENSE_SYSTEM}, value: {q(p.license)}}}"
        lines += ["    identifiers:", license_line]
    return lines


def patient_lines(p: Patient) -> list[str]:
    lines = [
        f"  - id: {p.id}",
        f"    name: {p.name}",
        f"    gender: {p.gender}",
        f"    birth_date: {p.birth_date.isoformat()}",
        f"    national_id: {q(p.national_id)}",
        f"    phone: {q(p.phone)}",
        f"    address: {p.address}",
        "    mrns:",
    ]
    lines += [f"      - {{organization: {org}, value: {q(value)}}}" for org, value in p.mrns]
    return lines


def render(orgs: list[Org], staff: list[Practitioner], people: list[Patient]) -> str:
    out = [HEADER, "organizations:"]
    for org in orgs:
        if org.level in ("township-health-center", "lab-center", "chest-pain-center"):
            out.append("")
        out += org_lines(org)
    out += ["", "# Imaging pixels stay in the county PACS; ImagingStudy.endpoint points here.", "endpoints:"]
    for endpoint_id, org, connection, address, name in ENDPOINTS:
        out += [
            f"  - id: {endpoint_id}",
            f"    organization: {org}",
            f"    connection_type: {connection}",
            f"    address: {address}",
            f"    name: {name}",
        ]
    out += ["", "practitioners:"]
    for p in staff:
        out += practitioner_lines(p)
    out += ["", "patients:"]
    for p in people:
        out += patient_lines(p)
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed file is out of date")
    args = parser.parse_args()
    rng = random.Random(SEED)
    text = render(organizations(rng), practitioners(rng), patients(rng))
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is out of date: run scripts/generate_demo_alliance.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text, encoding="utf-8")
    content = parse_directory_file(OUTPUT)
    print(
        f"wrote {OUTPUT.relative_to(REPO)}: {len(content.organizations)} organizations, "
        f"{len(content.endpoints)} endpoints, {len(content.practitioners)} practitioners, "
        f"{len(content.practitioner_roles)} practitioner roles, {len(content.patients)} patients"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Identifier validators and the facility-level vocabulary of the alliance directory.

National ID (居民身份证号码): GB 11643-1999. Unified social credit code (统一社会信用代码): GB 32100-2015.

Validators are strict about the canonical form: upper-case letters, no spaces. A national ID ending in a
lower-case ``x`` is not valid as stored; ``normalize_national_id`` (strip, upper-case) is what a caller applies
to user input first. Keeping one canonical spelling means a token search or a duplicate check never misses
a person because one HIS wrote ``x`` and another ``X``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from typing import Literal

NATIONAL_ID_SYSTEM = "urn:oid:2.16.156.10011.1.3"
USCC_SYSTEM = "http://county-alliance.org/fhir/sid/uscc"
FACILITY_LEVEL_SYSTEM = "http://county-alliance.org/fhir/CodeSystem/facility-level"
PRACTITIONER_LICENSE_SYSTEM = "http://county-alliance.org/fhir/sid/practitioner-license"


def mrn_system(organization_id: str) -> str:
    return f"http://county-alliance.org/fhir/sid/mrn/{organization_id}"


# --- National ID (GB 11643-1999, ISO 7064 MOD 11-2) -------------------------------------------------------

_NATIONAL_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_NATIONAL_ID_CHECK = "10X98765432"  # indexed by (weighted sum mod 11)
_NATIONAL_ID_RE = re.compile(r"[1-9][0-9]{16}[0-9X]")
# Nobody alive was born before this; it also rejects 00000000-style filler dates.
_EARLIEST_BIRTH = date(1850, 1, 1)


def national_id_check_char(first17: str) -> str:
    if len(first17) != 17 or not first17.isascii() or not first17.isdigit():
        raise ValueError("national ID check character needs exactly 17 digits")
    total = sum(int(d) * w for d, w in zip(first17, _NATIONAL_ID_WEIGHTS))
    return _NATIONAL_ID_CHECK[total % 11]


def normalize_national_id(value: str) -> str:
    return value.strip().upper()


def national_id_birth_date(value: str) -> date | None:
    """Birth date encoded in positions 7-14, or None when it is not a real calendar date."""
    digits = value[6:14]
    if len(digits) != 8 or not (digits.isascii() and digits.isdigit()):
        return None
    try:
        born = date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return None
    return born if _EARLIEST_BIRTH <= born <= date.today() else None


def national_id_gender(value: str) -> Literal["male", "female"]:
    # The 17th character is the sequence number's last digit: odd for men, even for women.
    return "male" if int(value[16]) % 2 == 1 else "female"


def is_valid_national_id(value: str) -> bool:
    if not isinstance(value, str) or not _NATIONAL_ID_RE.fullmatch(value):
        return False
    if national_id_birth_date(value) is None:
        return False
    return national_id_check_char(value[:17]) == value[17]


# --- Unified social credit code (GB 32100-2015) -------------------------------------------------------------

USCC_ALPHABET = "0123456789ABCDEFGHJKLMNPQRTUWXY"  # no I, O, Z, S, V
_USCC_WEIGHTS = (1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28)
_USCC_VALUE = {c: i for i, c in enumerate(USCC_ALPHABET)}
# Positions 3-8 are the registering authority's region code, always digits.
_USCC_RE = re.compile(r"[0-9A-HJ-NP-RTUW-Y]{2}[0-9]{6}[0-9A-HJ-NP-RTUW-Y]{10}")


def uscc_check_char(first17: str) -> str:
    if len(first17) != 17 or any(c not in _USCC_VALUE for c in first17):
        raise ValueError("USCC check character needs exactly 17 characters from the GB 32100 alphabet")
    total = sum(_USCC_VALUE[c] * w for c, w in zip(first17, _USCC_WEIGHTS))
    return USCC_ALPHABET[(31 - total % 31) % 31]


def normalize_uscc(value: str) -> str:
    return value.strip().upper()


def is_valid_uscc(value: str) -> bool:
    if not isinstance(value, str) or not _USCC_RE.fullmatch(value):
        return False
    return uscc_check_char(value[:17]) == value[17]


# --- Facility levels (Organization.type, system FACILITY_LEVEL_SYSTEM) -------------------------------------

FacilityKind = Literal["tier", "shared-center", "emergency-center"]


@dataclass(frozen=True)
class FacilityCode:
    code: str
    display: str
    kind: FacilityKind
    rank: int | None = None  # tiers only: higher ranks are higher tiers


FACILITY_CODES: dict[str, FacilityCode] = {
    fc.code: fc
    for fc in (
        FacilityCode("village-clinic", "村卫生室", "tier", 1),
        FacilityCode("township-health-center", "乡镇卫生院", "tier", 2),
        FacilityCode("county-hospital", "县医院", "tier", 3),
        FacilityCode("city-hospital", "市级医院", "tier", 4),
        FacilityCode("provincial-hospital", "省级医院", "tier", 5),
        FacilityCode("lab-center", "医学检验", "shared-center"),
        FacilityCode("imaging-center", "医学影像", "shared-center"),
        FacilityCode("ecg-center", "心电诊断", "shared-center"),
        FacilityCode("pathology-center", "病理", "shared-center"),
        FacilityCode("sterile-supply-center", "消毒供应", "shared-center"),
        FacilityCode("chest-pain-center", "胸痛中心", "emergency-center"),
        FacilityCode("stroke-center", "卒中中心", "emergency-center"),
        FacilityCode("trauma-center", "创伤中心", "emergency-center"),
        FacilityCode("critical-maternal-center", "危重孕产妇救治中心", "emergency-center"),
        FacilityCode("critical-neonatal-center", "危重儿童和新生儿救治中心", "emergency-center"),
    )
}

# partOf points up the tree: village → township → county → city → provincial; centers hang off the county.
_PARENT_CODES: dict[str, frozenset[str]] = {
    "village-clinic": frozenset({"township-health-center"}),
    "township-health-center": frozenset({"county-hospital"}),
    "county-hospital": frozenset({"city-hospital"}),
    "city-hospital": frozenset({"provincial-hospital"}),
    "provincial-hospital": frozenset(),
}


def allowed_parent_codes(child_code: str) -> frozenset[str]:
    """Facility codes an Organization of ``child_code`` may be ``partOf``; empty for the top tier.

    Raises KeyError for a code not in FACILITY_CODES.
    """
    facility = FACILITY_CODES[child_code]
    if facility.kind != "tier":
        return frozenset({"county-hospital"})
    return _PARENT_CODES[child_code]


def may_be_root(code: str) -> bool:
    """True when an Organization of this level may have no parent (the top of an alliance's tree).

    The county hospital and its upper partners may stand alone (an alliance without a city or provincial
    partner); clinics, township centers and the shared or emergency centers always belong to someone.
    """
    facility = FACILITY_CODES[code]
    return facility.kind == "tier" and facility.rank is not None and facility.rank >= 3

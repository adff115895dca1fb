from datetime import date, timedelta

import pytest

from directory.identifiers import (
    FACILITY_CODES,
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

# --- national ID ------------------------------------------------------------------------------------------

# The GB 11643-1999 example. By hand: weights 7 9 10 5 8 4 2 1 6 3 7 9 10 5 8 4 2 over 11010519491231002
# give 7+9+0+5+0+20+2+9+24+27+7+18+30+5+0+0+4 = 167; 167 mod 11 = 2; "10X98765432"[2] = X.
GB_EXAMPLE = "11010519491231002X"


def make_national_id(first17: str) -> str:
    return first17 + national_id_check_char(first17)


@pytest.mark.parametrize(
    "value",
    [
        GB_EXAMPLE,
        make_national_id("33082919800101123"),
        make_national_id("44030420000229004"),  # leap day
        make_national_id("65010219350615471"),
        make_national_id("81000020101010001"),  # Hong Kong residence permit region
    ],
)
def test_valid_national_ids(value: str) -> None:
    assert is_valid_national_id(value)


def test_check_char_of_the_standard_example() -> None:
    assert national_id_check_char("11010519491231002") == "X"


def _with_wrong_check(value: str) -> str:
    return value[:17] + ("0" if value[17] != "0" else "1")


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (_with_wrong_check(GB_EXAMPLE), "wrong check character"),
        ("110105194912310021", "wrong check character (digit instead of X)"),
        (GB_EXAMPLE[:17], "17 characters"),
        (GB_EXAMPLE + "0", "19 characters"),
        ("", "empty"),
        ("11010519491231002x", "lower-case x is not the canonical form"),
        (make_national_id("11010519990230002"), "30 February"),
        (make_national_id("11010519491331002"), "month 13"),
        (make_national_id("11010518000101002"), "born in 1800"),
        (make_national_id(f"110105{date.today() + timedelta(days=1):%Y%m%d}002"), "born tomorrow"),
        ("11010519A91231002X", "a letter in the digits part"),
        (make_national_id("01010519491231002"), "region code starting with 0"),
        (" " + GB_EXAMPLE, "leading space"),
        ("11010519491231002Y", "Y is not a check character"),
        ("１１０１０５１９４９１２３１００２Ｘ", "full-width digits"),
        ("1１0105194912310０2X", "some full-width digits"),
    ],
)
def test_invalid_national_ids(value: str, why: str) -> None:
    assert not is_valid_national_id(value), why


def test_lower_case_x_is_accepted_after_normalising() -> None:
    assert normalize_national_id(" 11010519491231002x ") == GB_EXAMPLE
    assert is_valid_national_id(normalize_national_id("11010519491231002x"))


def test_birth_date_and_gender_come_from_the_id() -> None:
    assert national_id_birth_date(GB_EXAMPLE) == date(1949, 12, 31)
    assert national_id_gender(GB_EXAMPLE) == "female"  # 17th digit 2 is even
    man = make_national_id("33082919800101123")
    assert national_id_gender(man) == "male"
    assert national_id_birth_date(make_national_id("11010519990230002")) is None


@pytest.mark.parametrize("bad", ["1101051949123100", "1101051949123100A", "110105194912310021"])
def test_national_id_check_char_refuses_bad_input(bad: str) -> None:
    with pytest.raises(ValueError):
        national_id_check_char(bad)


# --- unified social credit code -----------------------------------------------------------------------------

# Published codes of registered enterprises. By hand for the first: characters 9 1 3 5 0 1 0 0 M(21) 0 0 0
# 1 0 0 Y(30) 4 times weights 1 3 9 27 19 26 16 17 20 29 25 13 8 24 10 30 28 sum to 1640; 1640 mod 31 = 28;
# 31 - 28 = 3, the last character.
PUBLISHED_USCCS = ["91350100M000100Y43", "91110108551385082Q", "91440300708461136T", "91110000802100433B"]


@pytest.mark.parametrize("value", PUBLISHED_USCCS)
def test_published_usccs_are_valid(value: str) -> None:
    assert is_valid_uscc(value)
    assert uscc_check_char(value[:17]) == value[17]


@pytest.mark.parametrize(
    "first17",
    ["12330829470000001", "52330829MJ1234567", "11100000000013127", "93330829ABCDEFGHJ", "Y1330829000000000"],
)
def test_constructed_usccs_are_valid(first17: str) -> None:
    assert is_valid_uscc(first17 + uscc_check_char(first17))


def test_check_value_31_maps_to_zero() -> None:
    # Find a body whose weighted sum is a multiple of 31: its check character must be "0", not index 31.
    for n in range(10_000):
        first17 = f"123308294700{n:05d}"
        if uscc_check_char(first17) == "0":
            assert is_valid_uscc(first17 + "0")
            return
    pytest.fail("no body with check character 0 found")


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("91350100M000100Y44", "wrong check character"),
        ("91350100M000100Y4", "17 characters"),
        ("91350100M000100Y433", "19 characters"),
        ("91350100m000100y43", "lower case is not the canonical form"),
        ("91350100O000100Y43", "O is not in the alphabet"),
        ("91350100I000100Y43", "I is not in the alphabet"),
        ("913501Z0M000100Y43", "letter in the region code"),
        ("", "empty"),
    ],
)
def test_invalid_usccs(value: str, why: str) -> None:
    assert not is_valid_uscc(value), why


def test_uscc_lower_case_is_accepted_after_normalising() -> None:
    assert is_valid_uscc(normalize_uscc(" 91350100m000100y43 "))


@pytest.mark.parametrize("bad", ["9135010", "91350100M000100YO", "91350100m000100y4"])
def test_uscc_check_char_refuses_bad_input(bad: str) -> None:
    with pytest.raises(ValueError):
        uscc_check_char(bad)


# --- systems and facility levels ----------------------------------------------------------------------------


def test_mrn_system_is_per_organization() -> None:
    assert mrn_system("thc-xikou") == "http://county-alliance.org/fhir/sid/mrn/thc-xikou"


def test_facility_codes() -> None:
    tiers = sorted((fc for fc in FACILITY_CODES.values() if fc.kind == "tier"), key=lambda fc: fc.rank or 0)
    assert [fc.code for fc in tiers] == [
        "village-clinic",
        "township-health-center",
        "county-hospital",
        "city-hospital",
        "provincial-hospital",
    ]
    kinds = [fc.kind for fc in FACILITY_CODES.values()]
    assert kinds.count("shared-center") == 5 and kinds.count("emergency-center") == 5
    assert FACILITY_CODES["critical-neonatal-center"].display == "危重儿童和新生儿救治中心"


def test_allowed_parent_codes_draw_the_tree() -> None:
    assert allowed_parent_codes("village-clinic") == {"township-health-center"}
    assert allowed_parent_codes("township-health-center") == {"county-hospital"}
    assert allowed_parent_codes("county-hospital") == {"city-hospital"}
    assert allowed_parent_codes("city-hospital") == {"provincial-hospital"}
    assert allowed_parent_codes("provincial-hospital") == frozenset()
    for code, fc in FACILITY_CODES.items():
        if fc.kind != "tier":
            assert allowed_parent_codes(code) == {"county-hospital"}
    with pytest.raises(KeyError):
        allowed_parent_codes("hospital")


def test_only_county_level_and_above_may_be_roots() -> None:
    roots = {code for code in FACILITY_CODES if may_be_root(code)}
    assert roots == {"county-hospital", "city-hospital", "provincial-hospital"}

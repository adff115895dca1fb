"""Request bodies in and stored bytes out (fhirkit.jsonio): every number literal comes back as
written, whichever parser took it, and nesting is refused past MAX_NESTING."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fhirkit import jsonio
from fhirkit.errors import InvalidRequest


def _round_trip(literal: str) -> bytes:
    compact = jsonio.dumps(jsonio.loads(f'{{"value":{literal},"list":[{literal}]}}'.encode()))
    spaced = jsonio.dumps(jsonio.loads(f'{{ "value" : {literal} ,\n "list" : [ {literal}\t] }}'.encode()))
    assert spaced == compact
    return compact


# JSON number literals: a sign, an integer part without leading zeros, maybe decimals, maybe an exponent.
integer_parts = st.one_of(st.just("0"), st.from_regex(r"[1-9][0-9]{0,20}", fullmatch=True))
literals = st.builds(
    lambda sign, whole, decimals, exponent: f"{sign}{whole}{decimals}{exponent}",
    st.sampled_from(["", "-"]),
    integer_parts,
    st.one_of(st.just(""), st.from_regex(r"\.[0-9]{1,20}", fullmatch=True)),
    st.one_of(st.just(""), st.from_regex(r"[eE][-+]?[0-9]{1,3}", fullmatch=True)),
).filter(lambda text: text != "-0")  # an integer minus zero is 0 to both parsers


@given(literals)
def test_every_number_comes_back_as_written(literal: str) -> None:
    assert _round_trip(literal) == f'{{"value":{literal},"list":[{literal}]}}'.encode()


@pytest.mark.parametrize("literal", ["4.0", "-7.0", "0.0", "-0.0", "100.0", "12345678901234.0", "4.5", "12"])
def test_what_a_float_keeps_takes_the_fast_parser(literal: str) -> None:
    """A lone `.0` (lab values: 4.0 mmol/L) is kept by a float: orjson parses it, no Decimal."""
    value = jsonio.loads(f'{{"value":{literal}}}'.encode())["value"]
    assert type(value) in (float, int)
    assert _round_trip(literal) == f'{{"value":{literal},"list":[{literal}]}}'.encode()


@pytest.mark.parametrize("literal", ["4.00", "4.50", "1.10", "1e2", "1.0E-3", "1234567890123456.0", "12345678901234567"])
def test_what_a_float_would_change_keeps_its_text(literal: str) -> None:
    value = jsonio.loads(f'{{"value":{literal}}}'.encode())["value"]
    assert not isinstance(value, float)  # a FhirDecimal, or an exact int
    assert _round_trip(literal) == f'{{"value":{literal},"list":[{literal}]}}'.encode()


def test_strings_that_look_numeric_leave_the_fast_parser_alone() -> None:
    """Instants with milliseconds, 18-digit ID card numbers, UUIDs with `3e5` in them: a body
    full of them still takes orjson (its numbers come out as floats, not FhirDecimal)."""
    body = (b'{"resourceType":"Observation","issued":"2026-11-25T10:00:00.000+08:00",'
            b'"identifier":[{"value":"110101199003074512"},{"value":"urn:uuid:3e5a0d2e-1e10-4e00-8e9a-0e10d1e2f300"}],'
            b'"valueQuantity":{"value":4.5},"note":[{"text":"1.5 mmol/L, 1e3 cells"}]}')
    assert type(jsonio.loads(body)["valueQuantity"]["value"]) is float
    assert jsonio.dumps(jsonio.loads(body)) == body


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
@pytest.mark.parametrize("beside", [b"1.5", b"1.50"])  # either parser
def test_nan_and_infinity_are_refused_by_both_parsers(constant: bytes, beside: bytes) -> None:
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        jsonio.loads(b'{"value":' + beside + b',"other":' + constant + b"}")


def _nested(depth: int) -> bytes:
    return b'{"a":' * (depth - 1) + b"[1]" + b"}" * (depth - 1)


@pytest.mark.parametrize("lossy", [False, True])
def test_nesting_is_refused_past_the_limit_on_both_parsers(lossy: bool) -> None:
    number = b"1.50" if lossy else b"1"
    at_limit = _nested(jsonio.MAX_NESTING).replace(b"[1]", b"[" + number + b"]")
    assert jsonio.loads(at_limit)  # MAX_NESTING levels: the list is the last
    with pytest.raises(InvalidRequest, match="nests deeper than 64"):
        jsonio.loads(_nested(jsonio.MAX_NESTING + 1).replace(b"[1]", b"[" + number + b"]"))
    deep_list = b"[" * (jsonio.MAX_NESTING + 1) + number + b"]" * (jsonio.MAX_NESTING + 1)
    with pytest.raises(InvalidRequest, match="nests"):
        jsonio.loads(deep_list)
    # Far past the limit: refused as a 400 too, whichever part notices first.
    with pytest.raises(InvalidRequest):
        jsonio.loads(b"[" * 5000 + number + b"]" * 5000)


def test_scalars_and_wide_bodies_are_not_nesting() -> None:
    assert jsonio.loads(b"5") == 5
    wide = b'{"entry":[' + b",".join(b'{"resource":{"a":[{"b":1}]}}' for _ in range(5000)) + b"]}"
    assert len(jsonio.loads(wide)["entry"]) == 5000

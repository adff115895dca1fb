"""`format_instant`: the FHIR instant every stored `meta.lastUpdated` and many answers carry."""

import re

from fhirkit.search.values import date_range, format_instant

INSTANT = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def test_instants_are_utc_milliseconds_and_read_back_to_their_millisecond() -> None:
    assert format_instant(0) == "1970-01-01T00:00:00.000Z"
    assert format_instant(1_700_000_000_123_456) == "2023-11-14T22:13:20.123Z"
    assert format_instant(-1) == "1969-12-31T23:59:59.999Z"
    for micros in (0, 1_700_000_000_123_456, -1, 253_402_300_799_999_999):
        text = format_instant(micros)
        assert INSTANT.match(text), text
        low, _ = date_range(text)
        assert low == micros - micros % 1000


def test_an_early_year_keeps_four_digits() -> None:
    # strftime's %Y wrote year 1 as "1", which no FHIR instant may be.
    assert format_instant(-62_135_596_800_000_000) == "0001-01-01T00:00:00.000Z"

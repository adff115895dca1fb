"""Pure conversions shared by indexing (resource values) and query parsing (search values).

Dates become an inclusive range of microseconds since the Unix epoch (UTC), because a FHIR date
is a period at its precision: `2024-03` is all of March. A date, or a dateTime without a time
zone, is read in the deployment's local time zone (the spec leaves it to the server): the
alliance is in China, so by default China Standard Time, +08:00, and `2024-03-01` is the day as
lived in the county, 2024-02-29T16:00Z to 2024-03-01T16:00Z. The default is the fixed offset
rather than the IANA zone Asia/Shanghai: that zone also holds the 1986–1991 summer time and the
local mean time before 1901, which would move birth dates of those years by an hour or by minutes
from what Chinese systems mean by them, and it needs a time zone database. Stored values and
search values are read the same way; `ALLIANCE_TIME_ZONE` changes it (`set_local_time_zone`).
"""

import calendar
import functools
import re
import time
import unicodedata
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from decimal import Decimal, InvalidOperation
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_DATE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2})(?::(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d{1,9}))?)?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROS = 1_000_000
MIN_TIME = -(2**62)
MAX_TIME = 2**62
DEFAULT_TIME_ZONE = "+08:00"
_OFFSET = re.compile(r"^(?:UTC|GMT)?([+-])(\d{2}):?(\d{2})$")


def time_zone(name: str) -> tzinfo:
    """An IANA zone name (`Asia/Shanghai`), a fixed offset (`+08:00`, `UTC+0800`) or `UTC`/`Z`."""
    text = name.strip()
    if text in ("UTC", "Z", "GMT"):
        return UTC
    offset = _OFFSET.match(text)
    if offset:
        sign = 1 if offset.group(1) == "+" else -1
        delta = timedelta(hours=int(offset.group(2)), minutes=int(offset.group(3)))
        if delta >= timedelta(hours=24):
            raise ValueError(f"time zone offset '{name}' is out of range")
        return timezone(sign * delta)
    try:
        return ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"'{name}' is not a time zone (an IANA name such as Asia/Shanghai, or +08:00)") from None


_local_zone: tzinfo = time_zone(DEFAULT_TIME_ZONE)


def set_local_time_zone(zone: str | tzinfo) -> None:
    """Read dates and dateTimes without a zone in `zone` from now on (one setting per process:
    every service of a deployment, and its index, must use the same)."""
    global _local_zone
    _local_zone = time_zone(zone) if isinstance(zone, str) else zone


def local_time_zone() -> tzinfo:
    return _local_zone


def natural(text: str, limit: int = 2**63 - 1) -> int | None:
    """A non-negative integer written in ASCII digits that fits a BIGINT, else None.

    `str.isdigit()` alone lets through `²` (which `int()` refuses) and digit strings too long to
    convert or to store; every count, cursor and version number from a client goes through here.
    """
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(limit)):
        return None
    number = int(digits)
    return number if number <= limit else None


def now_micros() -> int:
    return time.time_ns() // 1000


def to_micros(moment: datetime) -> int:
    delta = moment - _EPOCH
    return (delta.days * 86400 + delta.seconds) * MICROS + delta.microseconds


_NAIVE_EPOCH = datetime(1970, 1, 1)  # UTC, without a zone: isoformat then writes none


def from_micros(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


def format_instant(micros: int) -> str:
    """FHIR instant with millisecond precision, the form `meta.lastUpdated` is written in.
    `isoformat` pads the year to four digits (strftime's `%Y` wrote year 1 as `1`) and costs
    half of strftime: a check writes five of these, its AuditEvent one more."""
    return (_NAIVE_EPOCH + timedelta(microseconds=micros)).isoformat(timespec="milliseconds") + "Z"


def date_range(text: str) -> tuple[int, int] | None:
    """The inclusive [low, high] microsecond range a FHIR date/dateTime/instant covers."""
    match = _DATE.match(text.strip()) if isinstance(text, str) else None
    if not match:
        return None
    try:
        return _range_from_match(match)
    except (ValueError, OverflowError):
        return None


def _range_from_match(match: re.Match[str]) -> tuple[int, int]:
    """Counted in integers: through datetimes a value cost 5-8 µs, and a lab result's write reads
    its times several times. A named zone's offset is looked up at both ends (summer time)."""
    y, m, d, hour, minute, second, fraction, tz = match.groups()
    year, month, day = int(y), int(m or 1), int(d or 1)
    start = (date(year, month, day).toordinal() - _EPOCH_ORDINAL) * _DAY  # date() refuses a bad day
    if m is None:
        span = (366 if calendar.isleap(year) else 365) * _DAY
    elif d is None:
        span = calendar.monthrange(year, month)[1] * _DAY
    elif hour is None:
        span = _DAY
    else:
        hours, minutes, seconds = int(hour), int(minute or 0), int(second or 0)
        if hours > 23 or minutes > 59 or seconds > 59:
            raise ValueError("time of day out of range")
        start += (hours * 3600 + minutes * 60 + seconds) * MICROS
        span = 60 * MICROS if second is None else MICROS
    zone = _zone(tz)
    low = start - _offset_micros(zone, start)
    if fraction is None:
        return low, start + span - _offset_micros(zone, start + span) - 1
    digits = min(len(fraction), 6)
    low += int(fraction[:6].ljust(6, "0"))
    return low, low + 10 ** (6 - digits) - 1


_DAY = 86_400 * MICROS
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


def _offset_micros(zone: tzinfo, local_micros: int) -> int:
    """The zone's offset from UTC at a local time, in microseconds."""
    offset = zone.utcoffset(None)  # a fixed offset answers without a moment; a named zone does not
    if offset is None:
        offset = zone.utcoffset(_NAIVE_EPOCH + timedelta(microseconds=local_micros))
        if offset is None:
            raise ValueError(f"the time zone {zone} has no offset")
    return (offset.days * 86400 + offset.seconds) * MICROS + offset.microseconds


def _zone(text: str | None) -> tzinfo:
    return _stated_zone(text) if text else _local_zone


@functools.lru_cache(maxsize=256)  # building a timezone cost 2 µs, a third of reading a dateTime
def _stated_zone(text: str) -> tzinfo:
    if text == "Z":
        return UTC
    sign = 1 if text[0] == "+" else -1
    return timezone(sign * timedelta(hours=int(text[1:3]), minutes=int(text[4:6])))


def normalize_string(text: str) -> str:
    """Case- and accent-insensitive form used by string search (`name=zhang` matches `Zhang`)."""
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(stripped.casefold().split())[:255]


def decimal_range(text: str) -> tuple[float, float, float] | None:
    """Value and the half-open precision range of a search number: `5.4` covers [5.35, 5.45)."""
    try:
        value = Decimal(text)
    except (InvalidOperation, ValueError):
        return None
    if not value.is_finite():
        return None
    exponent = value.as_tuple().exponent
    half = Decimal(5).scaleb(int(exponent) - 1) if isinstance(exponent, int) else Decimal(0)
    return float(value), float(value - half), float(value + half)

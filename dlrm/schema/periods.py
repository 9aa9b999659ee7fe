"""A schema's time column: its fields read as seconds since the epoch (UTC), and rows
grouped by the period (hour, day, week or month) their time falls in.

A dataset with a time column is laid out by period: each period's rows in time order, the
periods in order, so that a split is a range of rows (see ``splits``). A period is named
by its start: ``2014-10-21T03`` (hour), ``2014-10-21`` (day), ``2014-W43`` (ISO week,
from Monday), ``2014-10`` (month).
"""

from __future__ import annotations

import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

PERIODS = ("hour", "day", "week", "month")
UNIX = ("unix", "unix_ms")  # integer seconds / milliseconds; anything else: strptime's format
_DAY = 86_400
_INTEGER = r"^-?[0-9]{1,18}$"


def parse_times(column: pa.ChunkedArray | pa.Array, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """A time column's fields → (int64 seconds since the epoch, valid). Text is read as
    ``unix`` seconds, ``unix_ms`` milliseconds or by a strptime format such as
    ``%y%m%d%H``; a Parquet timestamp or date column as its own values. An empty or
    unparsable field is not valid."""
    t = column.type
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        values = pc.cast(pc.cast(column, pa.timestamp("s"), safe=False), pa.int64())
    else:
        text = pc.utf8_trim_whitespace(pc.cast(column, pa.string()))
        if fmt in UNIX:
            integer = pc.match_substring_regex(text, _INTEGER)
            values = pc.cast(pc.if_else(integer, text, None), pa.int64())
            if fmt == "unix_ms":
                values = pc.floor(pc.divide(pc.cast(values, pa.float64()), 1000.0))
                values = pc.cast(values, pa.int64())
        else:
            values = pc.cast(pc.strptime(text, format=fmt, unit="s", error_is_null=True),
                             pa.int64())
    ok = pc.is_valid(values).to_numpy(zero_copy_only=False)
    seconds = pc.fill_null(values, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    return seconds, ok


def period_keys(seconds: np.ndarray, period: str) -> np.ndarray:
    """Each time's period as an int64, increasing with time."""
    if period == "hour":
        return seconds // 3600
    if period == "day":
        return seconds // _DAY
    if period == "week":
        return (seconds // _DAY + 3) // 7  # 1970-01-01 was a Thursday: weeks from Monday
    return seconds.astype("datetime64[s]").astype("datetime64[M]").astype(np.int64)


def period_start(key: int, period: str) -> int:
    """The first second of a period."""
    if period == "hour":
        return key * 3600
    if period == "day":
        return key * _DAY
    if period == "week":
        return (key * 7 - 3) * _DAY
    return int(np.datetime64(int(key), "M").astype("datetime64[s]").astype(np.int64))


def period_name(key: int, period: str) -> str:
    start = np.datetime64(period_start(key, period), "s")
    if period == "hour":
        return str(start.astype("datetime64[h]"))
    if period == "week":
        year, week, _ = datetime.date.fromisoformat(str(start.astype("datetime64[D]"))
                                                    ).isocalendar()
        return f"{year}-W{week:02d}"
    return str(start.astype("datetime64[D]" if period == "day" else "datetime64[M]"))


def format_times(seconds: np.ndarray, fmt: str) -> list[str]:
    """Times as the text of a field in ``fmt`` (the inverse of ``parse_times``)."""
    if fmt == "unix":
        return [str(int(s)) for s in seconds]
    if fmt == "unix_ms":
        return [str(int(s) * 1000) for s in seconds]
    stamps = pa.array(seconds.astype(np.int64), pa.timestamp("s"))
    return pc.strftime(stamps, format=fmt).to_pylist()

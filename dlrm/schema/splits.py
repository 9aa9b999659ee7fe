"""Splits of a dataset: sources or exact row fractions of them, as row ranges of its files.

A split names the dataset's *units*: its sources (input files), or where the schema has a
time column its periods (``2014-10-21``), each in time order. ``*`` is the whole dataset in
that order, so ``*[0.9:1]`` is its last tenth: with a time column, its latest rows.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from dlrm.schema.manifest import Manifest

ALL = "*"
_SPEC = re.compile(r"^(?P<name>[^\[\]]+)(\[(?P<a>[0-9./]*):(?P<b>[0-9./]*)\])?$")


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of one Parquet file; ``bytes``: its size, as the manifest
    records it (None: not recorded, unchecked)."""

    path: Path
    start: int
    stop: int
    bytes: int | None = None


def default_split_specs(manifest: Manifest) -> dict[str, list[str]]:
    """The default splits, by row order, no row in two of them.

    Day files (torchrec_dlrm's convention), or the periods of a time column: train on all
    but the last; the last one's first half validates, its second half tests ([0:0.5]
    and [0.5:1] are exactly ``schema.holdout_halves``). A single one (Criteo Kaggle's
    ``train.txt``: 7 days in time order): its first 6/7 train, the 7th "day" is halved
    into val and test, as the DLRM paper splits it. (torchrec_dlrm's Kaggle path lets val
    and test overlap train.)
    """
    return default_unit_specs([u["name"] for u in manifest.units])


def default_unit_specs(names: list[str]) -> dict[str, list[str]]:
    """The default splits of units of these names, in order (see
    :func:`default_split_specs`)."""
    if len(names) == 1:
        (one,) = names
        return {"train": [f"{one}[0:6/7]"], "val": [f"{one}[6/7:13/14]"],
                "test": [f"{one}[13/14:1]"]}
    return {"train": names[:-1], "val": [f"{names[-1]}[0:0.5]"], "test": [f"{names[-1]}[0.5:1]"]}


def spec_name(spec: str) -> str | None:
    """The unit a spec names (``*`` for all); None if it is no spec."""
    m = _SPEC.match(spec) if isinstance(spec, str) else None
    return m["name"] if m else None


def _starts(units: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """Each unit's name and its global rows ``[start, stop)``, in order."""
    out, start = [], 0
    for u in units:
        out.append((u["name"], start, start + u["rows_accepted"]))
        start += u["rows_accepted"]
    return out


def unit_ranges(units: list[dict[str, Any]], specs: list[str], kind: str = "sources",
                ) -> list[tuple[int, int]]:
    """Each spec (``name`` or ``name[a:b]``; a, b fractions of its rows such as 0.5 or 6/7,
    exact, so that adjacent ranges never share a row; ``*`` for all units in order) as a
    range ``[lo, hi)`` of global rows: the rows of all ``units`` (each with its
    ``rows_accepted``) numbered in order. ``kind`` names the units in errors."""
    offsets = {name: (lo, hi - lo) for name, lo, hi in _starts(units)}
    offsets[ALL] = (0, sum(u["rows_accepted"] for u in units))
    ranges = []
    for spec in specs:
        m = _SPEC.match(spec) if isinstance(spec, str) else None
        if not m or m["name"] not in offsets:
            names = [u["name"] for u in units]
            shown = names if len(names) <= 12 else [*names[:5], "...", *names[-5:]]
            raise ValueError(
                f"split source {spec!r}: expected NAME or NAME[a:b] with NAME * (all) or "
                f"one of the dataset's {kind} {shown}"
            )
        offset, n = offsets[m["name"]]
        try:
            a = Fraction(m["a"] or "0")
            b = Fraction(m["b"] or "1")
        except (ValueError, ZeroDivisionError):
            a = b = Fraction(-1)
        if not 0 <= a <= b <= 1:
            raise ValueError(f"split source {spec!r}: need fractions 0 <= a <= b <= 1")
        # exact: [0.5:1] starts at n // 2
        ranges.append((offset + math.floor(a * n), offset + math.floor(b * n)))
    return ranges


def row_ranges(manifest: Manifest, specs: list[str]) -> list[tuple[int, int]]:
    """The global row ranges ``[lo, hi)`` that ``specs`` name in a dataset (see
    :func:`unit_ranges`), in the order of its units."""
    return unit_ranges(manifest.units, specs, manifest.unit_kind)


def resolve_split(dataset: str | Path, manifest: Manifest, specs: list[str]) -> list[Segment]:
    """Turns specs (see :func:`unit_ranges`) into segments of the dataset's files."""
    files = manifest.files
    segments: list[Segment] = []
    for lo, hi in row_ranges(manifest, specs):
        offset = 0
        for f in files:
            s, e = max(lo - offset, 0), min(hi - offset, f["rows"])
            if s < e:
                segments.append(Segment(Path(dataset) / f["path"], s, e, f.get("bytes")))
            offset += f["rows"]
    return segments


def merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Row ranges as disjoint, sorted ones covering the same rows."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(r for r in ranges if r[0] < r[1]):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def intersection(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The rows two lists of ranges share, as disjoint sorted ranges."""
    return merged([(max(x, y), min(p, q)) for x, p in merged(a) for y, q in merged(b)
                   if max(x, y) < min(p, q)])


def difference(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The rows of ``a`` that ``b`` lacks, as disjoint sorted ranges."""
    out = []
    for lo, hi in merged(a):
        for y, q in merged(b):
            if q <= lo or y >= hi:
                continue
            if y > lo:
                out.append((lo, y))
            lo = max(lo, q)
        if lo < hi:
            out.append((lo, hi))
    return out


def count_rows(ranges: list[tuple[int, int]]) -> int:
    return sum(hi - lo for lo, hi in merged(ranges))


def describe(manifest: Manifest, ranges: list[tuple[int, int]]) -> str:
    """Rows as a reader finds them: ``N rows (rows a..b-1 of period P, ...)``, the first
    few ranges named by the units they fall in."""
    parts = []
    for lo, hi in merged(ranges)[:3]:
        for name, s, e in _starts(manifest.units):
            a, b = max(lo, s), min(hi, e)
            if a < b:
                parts.append(f"{name} rows {a - s}..{b - s - 1}")
    more = ", ..." if len(merged(ranges)) > 3 else ""
    return f"{count_rows(ranges)} rows ({', '.join(parts[:4])}{more})"


def take_rows(segments: list[Segment], start: int, stop: int) -> list[Segment]:
    """The sub-segments covering global rows [start, stop) of a segment list."""
    out, offset = [], 0
    for seg in segments:
        n = seg.stop - seg.start
        s, e = max(start - offset, 0), min(stop - offset, n)
        if s < e:
            out.append(Segment(seg.path, seg.start + s, seg.start + e, seg.bytes))
        offset += n
    return out

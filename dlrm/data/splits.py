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

ALL = "*"
_SPEC = re.compile(r"^(?P<name>[^\[\]]+)(\[(?P<a>[0-9./]*):(?P<b>[0-9./]*)\])?$")


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of one Parquet file."""

    path: Path
    start: int
    stop: int


def split_units(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The units splits name, in order: the periods of a time column, else the sources."""
    return manifest["periods"] if "periods" in manifest else manifest["sources"]


def default_split_specs(manifest: dict[str, Any]) -> dict[str, list[str]]:
    """The default splits, by row order, no row in two of them.

    Day files (torchrec_dlrm's convention), or the periods of a time column: train on all
    but the last; the last one's first half validates, its second half tests ([0:0.5]
    and [0.5:1] are exactly ``schema.holdout_halves``). A single one (Criteo Kaggle's
    ``train.txt``: 7 days in time order): its first 6/7 train, the 7th "day" is halved
    into val and test, as the DLRM paper splits it. (torchrec_dlrm's Kaggle path lets val
    and test overlap train.)
    """
    names = [s["name"] for s in split_units(manifest)]
    if len(names) == 1:
        (one,) = names
        return {"train": [f"{one}[0:6/7]"], "val": [f"{one}[6/7:13/14]"],
                "test": [f"{one}[13/14:1]"]}
    return {"train": names[:-1], "val": [f"{names[-1]}[0:0.5]"], "test": [f"{names[-1]}[0.5:1]"]}


def resolve_split(dataset: str | Path, manifest: dict[str, Any], specs: list[str]) -> list[Segment]:
    """Turns specs (``name`` or ``name[a:b]``; a, b fractions of its rows such as 0.5 or
    6/7, exact, so that adjacent ranges never share a row; ``*`` for all units in
    order) into segments."""
    units = split_units(manifest)
    by_name = {s["name"]: s for s in units}
    by_name[ALL] = {"rows_accepted": sum(s["rows_accepted"] for s in units),
                    "files": [f for s in units for f in s["files"]]}
    segments: list[Segment] = []
    for spec in specs:
        m = _SPEC.match(spec)
        if not m or m["name"] not in by_name:
            names = [s["name"] for s in units]
            shown = names if len(names) <= 12 else [*names[:5], "...", *names[-5:]]
            raise ValueError(
                f"split source {spec!r}: expected NAME or NAME[a:b] with NAME * (all) or "
                f"one of the dataset's {'periods' if 'periods' in manifest else 'sources'} "
                f"{shown}"
            )
        source = by_name[m["name"]]
        n = source["rows_accepted"]
        try:
            a = Fraction(m["a"] or "0")
            b = Fraction(m["b"] or "1")
        except (ValueError, ZeroDivisionError):
            a = b = Fraction(-1)
        if not 0 <= a <= b <= 1:
            raise ValueError(f"split source {spec!r}: need fractions 0 <= a <= b <= 1")
        lo, hi = math.floor(a * n), math.floor(b * n)  # exact: [0.5:1] starts at n // 2
        offset = 0
        for f in source["files"]:
            s, e = max(lo - offset, 0), min(hi - offset, f["rows"])
            if s < e:
                segments.append(Segment(Path(dataset) / f["path"], s, e))
            offset += f["rows"]
    return segments


def take_rows(segments: list[Segment], start: int, stop: int) -> list[Segment]:
    """The sub-segments covering global rows [start, stop) of a segment list."""
    out, offset = [], 0
    for seg in segments:
        n = seg.stop - seg.start
        s, e = max(start - offset, 0), min(stop - offset, n)
        if s < e:
            out.append(Segment(seg.path, seg.start + s, seg.start + e))
        offset += n
    return out

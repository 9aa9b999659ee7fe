"""The rows a dataset's vocabularies are counted on (``dlrm preprocess --vocab-from SPEC``).

A vocabulary holds the values of the training rows only: a value that only val or test
rows hold must be out of vocabulary there, as it will be for a model serving new rows. The
rows are named as splits name them (``dlrm.schema.splits``: sources, or with a time column
periods, and exact fractions of them; default: the default split's training rows), but
they are known only once every chunk is read, since a chunk's place among the rows (and,
with a time column, the order of the rows) depends on all of them.

So the first pass counts every chunk that may hold counted rows, whole, and records its
rows: their number, and with a time column each second's count. Then each chunk is found
to lie wholly inside the counted rows (its counts are used as they are), wholly outside
(they are not), or across a bound: such a chunk is counted again, only its rows inside
(``recount_chunk``). The rows' global order is the dataset's: by source then chunk then
line, or with a time column by time, ties in that input order (the periods' stable sort).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dlrm.rows.chunks import Task
from dlrm.rows.layout import Layout
from dlrm.schema.periods import period_keys, period_name
from dlrm.schema.splits import ALL, count_rows, default_unit_specs, merged, spec_name, unit_ranges
from dlrm.utils.files import atomic_path

RECOUNT = "vocab"  # suffix of a recounted chunk's counts key
NEVER = np.iinfo(np.int64).max  # a bound past every row

Bound = tuple[int, int]  # (time, k): rows before it are those earlier than time, and the
# first k of that time (in input order)


def times_path(work: Path, key: str) -> Path:
    return work / "counts" / f"{key}.times.npy"


def save_times(work: Path, key: str, times: np.ndarray | None, rows: int) -> None:
    """A chunk's rows for the selection: each distinct time (seconds; ``times`` None: no
    time column, all ``rows`` at time 0) with its count, as a (2, n) int64 array."""
    if times is None:
        t, n = np.zeros(1 if rows else 0, np.int64), np.array([rows] if rows else [], np.int64)
    else:
        t, n = np.unique(times, return_counts=True)
    with atomic_path(times_path(work, key)) as tmp, open(tmp, "wb") as f:
        np.save(f, np.stack([t.astype(np.int64), n.astype(np.int64)]))


def counts_source(specs: list[str] | None, layout: Layout, task: Task) -> bool:
    """Whether the first pass counts ``task``: every chunk, unless the rows are named by
    whole sources (no time column), when only theirs."""
    if specs is None or layout.time is not None:
        return True
    names = [spec_name(s) or ALL for s in specs]
    return ALL in names or task.source in names


@dataclass
class Selection:
    """Which chunks' counts make the vocabulary: ``whole`` ones as counted, ``partial``
    ones (key → their bounds ``[(lo, hi)]``) counted again; the record for the manifest."""

    whole: list[str]
    partial: dict[str, list[tuple[Bound, Bound]]]
    record: dict[str, Any]
    units: list[dict[str, Any]]

    def keys(self) -> list[str]:
        """The counts keys to merge, in input order."""
        return self.whole + [f"{k}.{RECOUNT}" for k in self.partial]


def select(work: Path, tasks: list[Task], layout: Layout, specs: list[str] | None,
           counted: set[str]) -> Selection:
    """The chunks (``tasks`` in input order, ``counted`` those the first pass counted)
    whose rows ``specs`` name (None: the default split's training rows)."""
    hists = []
    for t in tasks:
        a = np.load(times_path(work, t.key))
        hists.append((a[0], a[1]))
    units = _units(hists, tasks, layout)
    kind = "periods" if layout.time else "sources"
    default = specs is None
    if default:
        specs = default_unit_specs([u["name"] for u in units])["train"]
    try:
        ranges = merged(unit_ranges(units, specs, kind))
    except ValueError as e:
        raise ValueError(f"--vocab-from: {e}") from None

    if layout.time is None:
        totals = np.array([0], np.int64), np.array([sum(int(n.sum()) for _, n in hists)])
    else:
        everything = np.concatenate([t for t, _ in hists])
        values = np.unique(everything)
        sums = np.zeros(values.size, np.int64)
        for t, n in hists:
            np.add.at(sums, np.searchsorted(values, t), n)
        totals = values, sums
    bounds = [(_bound(totals, lo), _bound(totals, hi)) for lo, hi in ranges]
    whole, partial = [], {}
    seen: dict[int, int] = {}  # rows of each bound's time in the chunks before
    for task, (t, n) in zip(tasks, hists, strict=True):
        mine, inside = [], 0
        local = {}
        for lo_hi in bounds:
            edges = []
            for time, k in lo_hi:
                here = int(n[np.searchsorted(t, time)]) if time in t else 0
                k_c = min(max(k - seen.get(time, 0), 0), here)
                local[time] = here
                edges.append((time, k_c))
            rows = [int(n[t < time].sum()) + k_c for time, k_c in edges]
            if rows[1] > rows[0]:
                inside += rows[1] - rows[0]
                mine.append(tuple(edges))
        for time, here in local.items():
            seen[time] = seen.get(time, 0) + here
        if inside == int(n.sum()) and inside:
            whole.append(task.key)
        elif inside:
            partial[task.key] = mine
        if inside and task.key not in counted:
            raise ValueError(f"--vocab-from: chunk {task.key} holds counted rows but was not "
                             "counted (a bug: the first pass chose its chunks wrongly)")
    record = {"specs": list(specs), "default": default, "rows": [list(r) for r in ranges],
              "rows_counted": count_rows(ranges)}
    return Selection(whole, partial, record, units)


def _bound(totals: tuple[np.ndarray, np.ndarray], g: int) -> Bound:
    """Global row ``g`` as a bound: the time of the row, and how many rows of that time
    come before it."""
    values, sums = totals
    cum = np.cumsum(sums)
    if not cum.size or g >= int(cum[-1]):
        return NEVER, 0
    i = int(np.searchsorted(cum, g, side="right"))
    return int(values[i]), g - (int(cum[i - 1]) if i else 0)


def _units(hists: list[tuple[np.ndarray, np.ndarray]], tasks: list[Task],
           layout: Layout) -> list[dict[str, Any]]:
    """The units splits name, with their rows: sources in order, or the periods of a time
    column in time order."""
    rows: dict[Any, int] = {}
    if layout.time is None:
        for task, (_, n) in zip(tasks, hists, strict=True):
            rows[task.source] = rows.get(task.source, 0) + int(n.sum())
        return [{"name": name, "rows_accepted": r} for name, r in rows.items()]
    for t, n in hists:
        keys = period_keys(t, layout.time.period)
        for key in np.unique(keys):
            rows[int(key)] = rows.get(int(key), 0) + int(n[keys == key].sum())
    return [{"name": period_name(k, layout.time.period), "rows_accepted": rows[k]}
            for k in sorted(rows) if rows[k]]


def row_mask(times: np.ndarray, seen: dict[int, int],
             ranges: list[tuple[Bound, Bound]]) -> np.ndarray:
    """Which rows of a block (``times``: each row's, 0 without a time column) lie inside the
    chunk's ``ranges``; ``seen`` (each bound's time → rows of it in earlier blocks) is
    updated."""
    inside = np.zeros(times.size, bool)
    occurrence = {}
    for time in {time for r in ranges for time, _ in r}:
        same = times == time
        occurrence[time] = (same, seen.get(time, 0) + np.cumsum(same) - 1)

    def before(bound: Bound) -> np.ndarray:
        time, k = bound
        same, occ = occurrence[time]
        return (times < time) | (same & (occ < k))

    for lo, hi in ranges:
        inside |= ~before(lo) & before(hi)
    for time, (same, _) in occurrence.items():
        seen[time] = seen.get(time, 0) + int(same.sum())
    return inside


def check_units(selection: Selection, manifest_units: list[dict[str, Any]]) -> None:
    """The units the selection was made over must be the dataset's, row for row."""
    got = [(u["name"], u["rows_accepted"]) for u in selection.units]
    want = [(u["name"], u["rows_accepted"]) for u in manifest_units]
    if got != want:
        raise RuntimeError(f"--vocab-from: the rows counted were placed among {got}, but the "
                           f"dataset holds {want}")

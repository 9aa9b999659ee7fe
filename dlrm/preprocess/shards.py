"""A chunk's encoded rows written as Parquet shards.

``Shards`` writes one sequence of files, ``SHARD_ROWS`` rows each in row groups of at most
``ROW_GROUP_ROWS``, each renamed into place once complete, so a file that exists under its
final name is whole. ``PeriodShards`` sends each row to its time period's ``Shards``
(``data/<period>/``), batching the rows of a period into full row groups while bounding
the rows it holds and the files it keeps open: an unsorted log's chunk can touch every
period.

Each file is written with page checksums (``integrity.WRITE``). Its entry records its rows
and size in bytes; with a time column also its first and last time and
whether its rows are in time order, from which the manifest's step decides whether a
period must be sorted. Each ``Shards`` also sums its standardized dense features (rows,
sum, sum of squares) for their mean and std.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dlrm.rows.layout import Layout
from dlrm.schema.integrity import WRITE
from dlrm.schema.periods import period_keys, period_name

ROW_GROUP_ROWS = 1 << 16
SHARD_ROWS = 1 << 20
MAX_OPEN = 64  # periods with an open file per chunk; the least recently written is closed
MAX_HELD = 4 * ROW_GROUP_ROWS  # rows held back across periods before all are written


def _partial(path: Path) -> Path:
    """Where this process writes ``path`` until it is complete."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


class Shards:
    """Files ``<directory>/<prefix>-<k>.parquet`` of rows in the layout's output schema."""

    def __init__(self, out_dir: Path, directory: Path, prefix: str, layout: Layout) -> None:
        self.out_dir, self.directory, self.prefix, self.layout = out_dir, directory, prefix, layout
        self.schema = layout.output_schema()
        self.files: list[dict[str, Any]] = []
        self.sums = np.zeros((len(layout.dense), 3))  # per dense feature: rows, sum, squares
        self.writer: pq.ParquetWriter | None = None
        self.rows = 0
        self.span: dict[str, Any] = {}  # the open file's first and last time, and order

    def _path(self, k: int) -> Path:
        return self.directory / f"{self.prefix}-{k:03d}.parquet"

    def write(self, table: pa.Table) -> None:
        for j in self.layout.standardized:
            x = table.column(1 + j).to_numpy()
            self.sums[j] += (x.size, x.sum(dtype=np.float64), np.square(x, dtype=np.float64).sum())
        start = 0
        while start < table.num_rows:
            if self.writer is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                tmp = self._path(len(self.files))
                self.writer = pq.ParquetWriter(_partial(tmp), self.schema,
                                               **WRITE)
            take = min(SHARD_ROWS - self.rows, table.num_rows - start)
            part = table.slice(start, take)
            self.writer.write_table(part, row_group_size=ROW_GROUP_ROWS)
            if self.layout.time is not None:
                self._track(part)
            self.rows += take
            start += take
            if self.rows == SHARD_ROWS:
                self.close()

    def _track(self, part: pa.Table) -> None:
        t = part.column(self.layout.time.column).cast(pa.int64()).to_numpy()
        if not t.size:
            return
        span = self.span
        ordered = bool(np.all(t[1:] >= t[:-1]) and span.get("last", t[0]) <= t[0])
        span["first"] = int(min(span.get("first", t.min()), t.min()))
        span["last"] = int(max(span.get("last", t.max()), t.max()))
        span["ordered"] = span.get("ordered", True) and ordered

    def close(self) -> None:
        """Closes the open file, if any, and renames it into place."""
        if self.writer is None:
            return
        self.writer.close()
        final = self._path(len(self.files))
        os.replace(_partial(final), final)
        self.files.append({"path": str(final.relative_to(self.out_dir)), "rows": self.rows,
                           "bytes": final.stat().st_size, **self.span})
        self.writer, self.rows, self.span = None, 0, {}


def remove_stale(directory: Path, prefix: str) -> None:
    """Removes the files an interrupted earlier try of a chunk left in ``directory``."""
    pattern = re.compile(re.escape(prefix) + r"-\d{3,}\.parquet(\.\d+\.tmp)?")
    if directory.is_dir():
        for f in directory.iterdir():
            if pattern.fullmatch(f.name):
                f.unlink()


class PeriodShards:
    """A chunk's rows by time period: ``data/<period>/<source>-<chunk>-<k>.parquet``."""

    def __init__(self, out_dir: Path, prefix: str, layout: Layout) -> None:
        self.out_dir, self.prefix, self.layout = out_dir, prefix, layout
        self.period = layout.time.period
        self.shards: dict[int, Shards] = {}
        self.open: OrderedDict[int, None] = OrderedDict()  # periods with an open file, LRU first
        self.held: dict[int, list[pa.Table]] = {}
        self.held_rows = 0
        data = out_dir / "data"
        for d in data.iterdir() if data.is_dir() else ():
            remove_stale(d, prefix)

    def write(self, table: pa.Table, time: np.ndarray) -> None:
        if not time.size:
            return
        keys = period_keys(time, self.period)
        if not np.all(keys[1:] >= keys[:-1]):  # a log in time order needs no reordering
            order = np.argsort(keys, kind="stable")
            keys, table = keys[order], table.take(order)
        bounds = np.flatnonzero(np.diff(keys)) + 1
        for a, b in zip(np.r_[0, bounds], np.r_[bounds, keys.size], strict=True):
            key = int(keys[a])
            self.held.setdefault(key, []).append(table.slice(a, b - a))
            self.held_rows += b - a
            if sum(t.num_rows for t in self.held[key]) >= ROW_GROUP_ROWS:
                self._write(key)
        if self.held_rows > MAX_HELD:
            for key in list(self.held):
                self._write(key)

    def _write(self, key: int) -> None:
        parts = self.held.pop(key)
        self.held_rows -= sum(t.num_rows for t in parts)
        if key not in self.shards:
            name = period_name(key, self.period)
            self.shards[key] = Shards(self.out_dir, self.out_dir / "data" / name, self.prefix,
                                      self.layout)
        self.shards[key].write(pa.concat_tables(parts))
        self.open[key] = None
        self.open.move_to_end(key)
        while len(self.open) > MAX_OPEN:
            lru, _ = self.open.popitem(last=False)
            self.shards[lru].close()

    def close(self) -> None:
        for key in list(self.held):
            self._write(key)
        for s in self.shards.values():
            s.close()

    @property
    def files(self) -> list[dict[str, Any]]:
        return [dict(f, period=period_name(k, self.period))
                for k in sorted(self.shards) for f in self.shards[k].files]

    def sums_by_period(self) -> dict[str, list]:
        return {period_name(k, self.period): s.sums.tolist()
                for k, s in sorted(self.shards.items())}

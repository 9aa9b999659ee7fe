"""Parquet dataset → ``torchrec.datasets.utils.Batch`` per rank.

A split is a list of row ranges over the manifest's shard files. Its rows are cut into
``world_size`` contiguous parts, one per (global) rank. Every rank yields the same
number of batches, whatever the part sizes, so no rank ever waits alone in a
collective:

* training (``pad=False``): ``(rows // world_size) // batch_size`` full batches per
  rank; the remainder (< world_size × batch_size rows) is left out of the epoch;
* evaluation (``pad=True``): every row is seen once; the last batches are padded to
  the full batch size with rows whose label is ``PAD_LABEL``, which metrics drop.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm.data.schema import DENSE_NAMES, LABEL, MISSING_ID, SPARSE_NAMES

PAD_LABEL = -1.0
_SPEC = re.compile(r"^(?P<name>[^\[\]]+)(\[(?P<a>[0-9.]*):(?P<b>[0-9.]*)\])?$")


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of one Parquet file."""

    path: Path
    start: int
    stop: int


def default_split_specs(manifest: dict[str, Any]) -> dict[str, list[str]]:
    """torchrec_dlrm's convention: train on all sources but the last; its halves: val, test."""
    names = [s["name"] for s in manifest["sources"]]
    if len(names) < 2:
        raise ValueError(
            f"the default splits need at least 2 sources, the dataset has {names}; "
            "set data.train_sources / val_sources / test_sources"
        )
    # Fractions are exact (see resolve_split): [0:0.5] and [0.5:1] are schema.holdout_halves.
    return {"train": names[:-1], "val": [f"{names[-1]}[0:0.5]"], "test": [f"{names[-1]}[0.5:1]"]}


def resolve_split(dataset: str | Path, manifest: dict[str, Any], specs: list[str]) -> list[Segment]:
    """Turns specs (``name`` or ``name[a:b]``, a and b fractions of its rows) into segments."""
    by_name = {s["name"]: s for s in manifest["sources"]}
    segments: list[Segment] = []
    for spec in specs:
        m = _SPEC.match(spec)
        if not m or m["name"] not in by_name:
            raise ValueError(
                f"split source {spec!r}: expected NAME or NAME[a:b] with NAME one of "
                f"{sorted(by_name)}"
            )
        source = by_name[m["name"]]
        n = source["rows_accepted"]
        try:
            a = Fraction(m["a"] or "0")
            b = Fraction(m["b"] or "1")
        except ValueError:
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


def _take(segments: list[Segment], start: int, stop: int) -> list[Segment]:
    """The sub-segments covering global rows [start, stop) of a segment list."""
    out, offset = [], 0
    for seg in segments:
        n = seg.stop - seg.start
        s, e = max(start - offset, 0), min(stop - offset, n)
        if s < e:
            out.append(Segment(seg.path, seg.start + s, seg.start + e))
        offset += n
    return out


def make_batch(labels: np.ndarray, dense: np.ndarray, sparse: np.ndarray) -> Batch:
    """Builds a Batch from ``labels [B]``, ``dense [B, 13]`` and ``sparse ids [B, 26]``.

    One id per row and feature (Criteo is one-hot), so every KJT length is 1 and the
    values are the ids feature-major, as KeyedJaggedTensor lays them out.
    """
    b, f = sparse.shape
    values = torch.from_numpy(np.ascontiguousarray(sparse.T).reshape(-1))
    return Batch(
        dense_features=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
        sparse_features=KeyedJaggedTensor.from_lengths_sync(
            keys=SPARSE_NAMES, values=values, lengths=torch.ones(b * f, dtype=torch.int32)
        ),
        labels=torch.from_numpy(labels.astype(np.float32)),
    )


class ParquetBatches:
    """Iterable of Batch over this rank's part of a split.

    Args:
        segments: the split (see :func:`resolve_split`).
        batch_size: rows per batch on this rank.
        rank, world_size: global rank and number of ranks.
        pad: evaluation mode (see module doc).

    Example::

        batches = ParquetBatches(resolve_split(d, m, ["day_0"]), 512, rank=0, world_size=2)
        for batch in batches:  # len(batches) batches, identical count on every rank
            ...
    """

    def __init__(self, segments: list[Segment], batch_size: int, rank: int, world_size: int,
                 pad: bool = False) -> None:
        self.batch_size = batch_size
        self.pad = pad
        total = sum(s.stop - s.start for s in segments)
        self.rows_total = total
        lo, hi = rank * total // world_size, (rank + 1) * total // world_size
        self.segments = _take(segments, lo, hi)
        if pad:
            self.num_batches = math.ceil(math.ceil(total / world_size) / batch_size)
        else:
            self.num_batches = (total // world_size) // batch_size
        self.rows = hi - lo if pad else self.num_batches * batch_size

    def __len__(self) -> int:
        return self.num_batches

    def _row_blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        columns = [LABEL, *DENSE_NAMES, *SPARSE_NAMES]
        for seg in self.segments:
            pf = pq.ParquetFile(seg.path)
            offset = 0
            for g in range(pf.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                s, e = max(seg.start - offset, 0), min(seg.stop - offset, n)
                offset += n
                if s >= e:
                    continue
                t = pf.read_row_group(g, columns=columns).slice(s, e - s)
                cols = [c.to_numpy() for c in t.columns]
                yield (cols[0], np.stack(cols[1:14], axis=1), np.stack(cols[14:], axis=1))

    def __iter__(self) -> Iterator[Batch]:
        b = self.batch_size
        pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        have, emitted = 0, 0
        blocks = self._row_blocks()
        while emitted < self.num_batches:
            block = next(blocks, None)
            if block is not None:
                pending.append(block)
                have += len(block[0])
                if have < b:
                    continue
            elif have < b:  # out of rows: only evaluation gets here, to pad
                pending.append(self._padding(b - have))
                have = b
            parts = [np.concatenate(x) for x in zip(*pending, strict=True)]
            while have >= b and emitted < self.num_batches:
                yield make_batch(parts[0][:b], parts[1][:b], parts[2][:b])
                parts = [p[b:] for p in parts]
                have -= b
                emitted += 1
            pending = [tuple(parts)] if have else []

    @staticmethod
    def _padding(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (np.full(n, PAD_LABEL, np.float32), np.zeros((n, len(DENSE_NAMES)), np.float32),
                np.full((n, len(SPARSE_NAMES)), MISSING_ID, np.int64))

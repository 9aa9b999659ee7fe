"""Parquet dataset → ``torchrec.datasets.utils.Batch`` per rank.

A split is a list of row ranges over the manifest's shard files. Its rows are cut into
``world_size`` contiguous parts, one per (global) rank. Every rank yields the same
number of batches, whatever the part sizes, so no rank ever waits alone in a
collective:

* training (``pad=False``): ``(rows // world_size) // batch_size`` full batches per
  rank; the remainder (< world_size × batch_size rows) is left out of the epoch, always
  the same rows (the tail of each rank's part), shuffled or not;
* evaluation (``pad=True``): every row is seen once; the last batches are padded to
  the full batch size with rows whose label is ``PAD_LABEL``, which metrics drop.

On top of that, :class:`ParquetBatches` can

* read ahead in a background thread (``prefetch`` batches; pyarrow releases the GIL
  while it reads and decodes), so the training step never waits on Parquet;
* shuffle (``shuffle_buffer`` > 0): the order of the rank's row groups, then its rows
  through a shuffle buffer, seeded by (seed, epoch, rank), so every epoch has its own
  reproducible order and the same rows;
* read multi-hot features: a ``Cx`` column of type ``list<int>`` becomes a jagged
  feature (lengths = list sizes); plain integer columns keep the one-hot fast path;
* expand one-hot ids into MLPerf DLRMv2's synthetic multi-hot bags (:class:`MultiHot`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
from torchrec.datasets.utils import Batch

from dlrm.data.batches import Rows, is_list_type, table_rows, to_batch
from dlrm.data.multi_hot import MultiHot
from dlrm.data.oov_dropout import drop_to_oov
from dlrm.data.prefetch import Prefetcher
from dlrm.schema.features import MISSING_ID, Features
from dlrm.schema.integrity import (
    check_column_ids,
    check_file,
    open_parquet,
    read_metadata,
    read_row_group,
)
from dlrm.schema.splits import Segment, take_rows

PAD_LABEL = -1.0


class _Piece(NamedTuple):
    """Rows ``[start, stop)`` of one row group of a file; ``row``: the split's number of
    its first row, ``file_row``: the file's."""

    path: Path
    bytes: int | None
    group: int
    start: int
    stop: int
    row: int
    file_row: int

def _shuffle(blocks: Iterator[Rows], buffer: int, rng: np.random.Generator) -> Iterator[Rows]:
    """The rows of ``blocks`` in random order, through a pool of ``buffer`` rows.

    Blocks (row groups) enter the pool whole. Whenever it holds at least 1.5 × ``buffer``
    rows, all but ``buffer`` of them leave, drawn uniformly at random from the whole pool;
    what is left when the input ends leaves in random order. Each emission copies the pool
    once, so the cost per row is a small constant; memory is ~1.5 × ``buffer`` rows plus a
    row group.
    """
    pool: list[Rows] = []
    have, enough = 0, max(1, buffer // 2)
    for block in blocks:
        pool.append(block)
        have += len(block)
        surplus = have - buffer
        if surplus < enough:
            continue
        rows, order = Rows.concat(pool), rng.permutation(have)
        yield rows.take(order[:surplus])
        pool, have = [rows.take(order[surplus:])], buffer
    if have:
        yield Rows.concat(pool).take(rng.permutation(have))


def _columns(features: Features) -> list[str]:
    return [features.label, *features.dense, *features.sparse]


def _list_features(segments: list[Segment], features: Features) -> list[bool]:
    """Which sparse columns hold bags (list<int>) rather than ids, from the first file."""
    if not segments:
        return [False] * len(features.sparse)
    path = segments[0].path
    schema = read_metadata(path, segments[0].bytes).schema.to_arrow_schema()
    missing = [c for c in _columns(features) if c not in schema.names]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(missing)}")
    kinds = []
    for name in features.sparse:
        t = schema.field(name).type
        if is_list_type(t) and pa.types.is_integer(t.value_type):
            kinds.append(True)
        elif pa.types.is_integer(t):
            kinds.append(False)
        else:
            raise ValueError(f"{path}: column {name} is {t}; expected integer ids or a list "
                             "of integer ids")
    return kinds


# ------------------------------------------------------------------ the loader


class ParquetBatches:
    """Iterable of Batch over this rank's part of a split.

    Args:
        segments: the split (see :func:`resolve_split`).
        batch_size: rows per batch on this rank.
        rank, world_size: global rank and number of ranks.
        pad: evaluation mode (see module doc).
        features: the dataset's columns (``manifest.features``): the label, the dense
            features (the batch's dense tensor, in this order) and the categorical ones
            (the KJT's keys, in this order).
        shuffle_buffer: 0 reads in order (torchrec_dlrm); > 0 shuffles the order of the
            rank's row groups, then its rows through a pool of that many rows
            (:func:`_shuffle`). The order depends on ``seed``, the epoch and the rank only;
            the rows of an epoch, and the number of batches, are those of the unshuffled
            order.
        seed: seed of the shuffle.
        epoch: epoch of the first iteration; each iteration (``iter()``) advances it by
            one, so a training loop over epochs gets a new order each epoch. ``set_epoch``
            sets it, e.g. when resuming.
        prefetch: batches made ahead by a background thread; 0: made in the caller's
            thread, on demand.
        multi_hot_sizes: empty, or the bag size of each categorical feature: one-hot ids
            are expanded into MLPerf DLRMv2's synthetic multi-hot bags (:class:`MultiHot`).
            A feature stored as a list column must have size 1 (it is multi-hot already).
        cardinalities: ids per feature (``Manifest.cardinalities``); needed with
            ``multi_hot_sizes``. Where given, every row group's ids are checked against
            them as it is read (``integrity.check_ids``): an id outside its table stops
            the epoch with a DataError naming the feature, the id and the file.
        multi_hot_seed: seed of the multi-hot tables; 0 gives MLPerf's.
        features: the dataset's columns (``Manifest.features``): the label, the dense
            features (the batch's dense tensor, in this order) and the categorical ones
            (the KJT's keys, in this order).
        finish: applied to each batch by the thread that makes it (the prefetch thread,
            if any), e.g. ``Batch.pin_memory`` for a GPU: the pipeline's asynchronous copy
            to the device is only asynchronous from page-locked memory.

    A sparse column may hold one id per row (integers: the one-hot fast path) or a bag
    of ids (``list<int>``: KJT lengths are the list sizes, a null list an empty bag);
    both kinds may be mixed. Padding rows get id ``MISSING_ID``, a bag ``[MISSING_ID]``
    in a list column.

    Every file is checked before anything is read: present, and of the size the manifest
    records (``Segment.bytes``); every page read verifies its checksum (``integrity``).

    Example::

        batches = ParquetBatches(resolve_split(d, m, ["day_0"]), 512, rank=0, world_size=2,
                                 features=m.features)
        for batch in batches:  # len(batches) batches, identical count on every rank
            ...
    """

    def __init__(self, segments: list[Segment], batch_size: int, rank: int, world_size: int,
                 pad: bool = False, *, features: Features, shuffle_buffer: int = 0,
                 seed: int = 0, epoch: int = 0, prefetch: int = 4,
                 multi_hot_sizes: Sequence[int] = (),
                 cardinalities: Sequence[int] | None = None, multi_hot_seed: int = 0,
                 finish: Callable[[Batch], Batch] | None = None,
                 oov_dropout: dict[int, float] | None = None) -> None:
        if batch_size <= 0 or shuffle_buffer < 0 or prefetch < 0:
            raise ValueError(f"need batch_size > 0, shuffle_buffer >= 0, prefetch >= 0; got "
                             f"{batch_size}, {shuffle_buffer}, {prefetch}")
        self.batch_size = batch_size
        self.pad = pad
        self.rank = rank
        self.shuffle_buffer, self.seed, self.epoch = shuffle_buffer, seed, epoch
        self.prefetch = prefetch
        self.finish = finish
        total = sum(s.stop - s.start for s in segments)
        self.rows_total = total
        lo, hi = rank * total // world_size, (rank + 1) * total // world_size
        if pad:
            self.num_batches = math.ceil(math.ceil(total / world_size) / batch_size)
        else:
            self.num_batches = (total // world_size) // batch_size
        self.rows = hi - lo if pad else self.num_batches * batch_size
        # Only the rows yielded are read: shuffling reorders them, never swaps some out.
        self.segments = take_rows(segments, lo, lo + self.rows)
        self.first_row = lo
        self.oov_dropout = oov_dropout or {}
        self.features = features
        for path, size in dict((s.path, s.bytes) for s in segments).items():
            check_file(path, size)
        self._list_features = _list_features(segments, features)
        self.cardinalities = None if cardinalities is None else list(cardinalities)
        self.multi_hot: MultiHot | None = None
        if multi_hot_sizes:
            if cardinalities is None:
                raise ValueError("multi_hot_sizes needs the cardinality of every feature "
                                 "(the manifest's cardinalities)")
            self.multi_hot = MultiHot(multi_hot_sizes, cardinalities, multi_hot_seed,
                                      names=features.sparse)
            for f, is_list in enumerate(self._list_features):
                if is_list and self.multi_hot.sizes[f] > 1:
                    raise ValueError(f"multi_hot_sizes: {features.sparse[f]} is a list column "
                                     f"(multi-hot already); its size must be 1, got "
                                     f"{self.multi_hot.sizes[f]}")

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch of the next iteration (its shuffle order)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self.iter_epoch(epoch)

    def iter_epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` from batch number ``skip`` on (to resume mid-epoch:
        the same batches an uninterrupted run would have gone on with)."""
        produce = functools.partial(self._produce, epoch, skip)
        return Prefetcher(produce, self.prefetch) if self.prefetch else produce()

    def _produce(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        """The batches of one epoch (run by the prefetch thread, if any)."""
        chunks: Iterator[_Piece] = self._chunks()
        if self.shuffle_buffer:
            rng = np.random.default_rng([self.seed, epoch, self.rank])
            pieces = list(chunks)
            chunks = iter([pieces[i] for i in rng.permutation(len(pieces))])
            blocks = _shuffle(self._read(chunks), self.shuffle_buffer, rng)
        else:
            blocks = self._read(chunks)
        for i, rows in enumerate(self._batches(blocks)):
            if i >= skip:  # skipped batches are read (the shuffle order needs them), not built
                if self.oov_dropout:
                    drop_to_oov(rows.sparse, rows.row, self.oov_dropout, self.seed, epoch)
                batch = to_batch(rows, self.features.sparse, self.multi_hot)
                yield self.finish(batch) if self.finish else batch

    def _chunks(self) -> Iterator[_Piece]:
        """Each piece of this rank's part, in order."""
        row = self.first_row
        for seg in self.segments:
            meta = read_metadata(seg.path, seg.bytes)
            offset = 0
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                s, e = max(seg.start - offset, 0), min(seg.stop - offset, n)
                if s < e:
                    yield _Piece(seg.path, seg.bytes, g, s, e, row, offset + s)
                    row += e - s
                offset += n
                if offset >= seg.stop:
                    break

    def _read(self, chunks: Iterator[_Piece]) -> Iterator[Rows]:
        columns = _columns(self.features)
        file, open_path = None, None
        try:
            for path, size, g, s, e, row, file_row in chunks:
                if path != open_path:
                    if file is not None:
                        file.close()
                    file, open_path = open_parquet(path, size), path
                # On the calling thread: no Arrow thread pool, whose threads could still be
                # alive when the process exits and abort it (apache/arrow#34314); one core
                # a rank gains nothing from them, and the prefetch thread overlaps reads.
                group = read_row_group(file, path, g, columns=columns, use_threads=False)
                rows = self._rows(group.slice(s, e - s), path)
                if self.cardinalities is not None:
                    self._check_ids(rows, path, file_row)
                if self.oov_dropout:
                    rows.row = np.arange(row, row + e - s, dtype=np.int64)
                yield rows
        finally:
            if file is not None:
                file.close()

    def _rows(self, table: pa.Table, path: Path) -> Rows:
        return table_rows(table, self.features, self._list_features, path)

    def _check_ids(self, rows: Rows, path: Path, file_row: int) -> None:
        for name, size, column in zip(self.features.sparse, self.cardinalities, rows.sparse,
                                      strict=True):
            check_column_ids(column, size, name, path, file_row)

    def _batches(self, blocks: Iterator[Rows]) -> Iterator[Rows]:
        """Cuts the blocks into ``num_batches`` batches; in evaluation, pads the last ones."""
        b, pending, have, emitted = self.batch_size, [], 0, 0

        def padded() -> Iterator[Rows]:
            n = 0
            for block in blocks:
                n += len(block)
                yield block
            if self.pad and n < self.num_batches * b:
                yield self._padding(self.num_batches * b - n)

        for block in padded():
            pending.append(block)
            have += len(block)
            if have < b:
                continue
            rows, start = Rows.concat(pending), 0
            while have - start >= b and emitted < self.num_batches:
                yield rows.slice(start, start + b)
                start += b
                emitted += 1
            pending, have = ([rows.slice(start, have)] if start < have else []), have - start
            if emitted == self.num_batches:
                return

    def _padding(self, n: int) -> Rows:
        ids = np.full(n, MISSING_ID, np.int64)
        bags = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), pa.array(ids))
        return Rows(np.full(n, PAD_LABEL, np.float32),
                     np.zeros((n, len(self.features.dense)), np.float32),
                     [bags if is_list else ids for is_list in self._list_features])

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

import atexit
import functools
import math
import queue
import re
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm.data.schema import CRITEO, MISSING_ID, Features

PAD_LABEL = -1.0
_SPEC = re.compile(r"^(?P<name>[^\[\]]+)(\[(?P<a>[0-9./]*):(?P<b>[0-9./]*)\])?$")


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of one Parquet file."""

    path: Path
    start: int
    stop: int


def default_split_specs(manifest: dict[str, Any]) -> dict[str, list[str]]:
    """The default splits, by row order, no row in two of them.

    Day files (torchrec_dlrm's convention): train on all sources but the last; the last
    one's first half validates, its second half tests ([0:0.5] and [0.5:1] are exactly
    ``schema.holdout_halves``). A single source (Criteo Kaggle's ``train.txt``: 7 days in
    time order): its first 6/7 train, the 7th "day" is halved into val and test, as the
    DLRM paper splits it. (torchrec_dlrm's Kaggle path lets val and test overlap train.)
    """
    names = [s["name"] for s in manifest["sources"]]
    if len(names) == 1:
        (one,) = names
        return {"train": [f"{one}[0:6/7]"], "val": [f"{one}[6/7:13/14]"],
                "test": [f"{one}[13/14:1]"]}
    return {"train": names[:-1], "val": [f"{names[-1]}[0:0.5]"], "test": [f"{names[-1]}[0.5:1]"]}


def resolve_split(dataset: str | Path, manifest: dict[str, Any], specs: list[str]) -> list[Segment]:
    """Turns specs (``name`` or ``name[a:b]``; a, b fractions of its rows such as 0.5 or
    6/7, exact, so that adjacent ranges never share a row) into segments."""
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


# ------------------------------------------------------------------ multi-hot expansion

_DRAW_ROWS = 1 << 20  # table rows drawn per call: caps the int64 temporary, same stream


@functools.lru_cache(maxsize=2)
def _multi_hot_tables(sizes: tuple[int, ...], cardinalities: tuple[int, ...],
                      seed: int) -> tuple[np.ndarray | None, ...]:
    rng = np.random.RandomState(seed)  # the reference: np.random.seed(0), np.random.randint
    tables: list[np.ndarray | None] = []
    for size, card in zip(sizes, cardinalities, strict=True):
        if size == 1:  # the reference draws (card, 0) ids here: nothing, the stream is unmoved
            tables.append(None)  # the identity: ids pass through
            continue
        table = np.empty((card, size), np.int32 if card <= 2**31 else np.int64)
        table[:, 0] = np.arange(card)
        for start in range(0, card, _DRAW_ROWS):
            stop = min(start + _DRAW_ROWS, card)
            table[start:stop, 1:] = rng.randint(0, card, size=(stop - start, size - 1))
        tables.append(table)
    return tuple(tables)


class MultiHot:
    """MLPerf DLRMv2's synthetic multi-hot expansion of one-hot ids.

    Follows torchrec_dlrm's ``Multihot`` with ``dist_type="uniform"`` (facebookresearch/dlrm,
    ``torchrec_dlrm/multi_hot.py``): the MLPerf Training DLRMv2 reference, which also wrote
    the multi-hot Criteo 1TB dataset with it (``materialize_synthetic_multihot_dataset.py``).
    Feature f, with C_f ids and bag size s_f, gets a lookup table ``[C_f, s_f]``: column 0 is
    the id itself, the other s_f - 1 columns are ids drawn once, uniformly from [0, C_f), by
    ``np.random.RandomState(seed).randint(0, C_f, (C_f, s_f - 1))``, feature after feature:
    the reference's ``np.random.seed(0)`` and ``np.random.randint`` calls. With ``seed=0``
    the tables are the reference's, so an id becomes the same bag as in MLPerf. (The extra
    ids are drawn independently for every id; they are not per-feature offsets
    ``(i + o_k) % C_f``, which the reference does not use.)

    Missing values (id 0) are expanded like every other id, as in the reference (torchrec's
    Criteo preprocessing maps them to id 0 too and the reference does not single them out):
    every bag of feature f has exactly s_f ids, first the original id.

    Memory: Σ C_f × (s_f - 1) int32 per process (no table where s_f = 1), built once per
    process and shared by every loader. With MLPerf's sizes on Criteo 1TB (40M-row tables)
    that is ~23 GB, which is why MLPerf materialises the bags offline; on hash-capped
    or small vocabularies it is small.
    """

    def __init__(self, sizes: Sequence[int], cardinalities: Sequence[int], seed: int = 0,
                 names: Sequence[str] = CRITEO.sparse) -> None:
        n = len(names)
        if len(sizes) != n or not all(s >= 1 for s in sizes):
            raise ValueError(f"multi_hot_sizes: need {n} ints >= 1, got {list(sizes)}")
        if len(cardinalities) != n or not all(c >= 1 for c in cardinalities):
            raise ValueError(f"cardinalities: need {n} ints >= 1, got {cardinalities}")
        self.names = list(names)
        self.sizes = [int(s) for s in sizes]
        self.cardinalities = [int(c) for c in cardinalities]
        self.seed = seed
        self.tables = _multi_hot_tables(tuple(self.sizes), tuple(self.cardinalities), seed)

    def expand(self, feature: int, ids: np.ndarray) -> np.ndarray:
        """The bags of ``ids`` (feature index ``feature``), concatenated: [len(ids) × s_f]."""
        table = self.tables[feature]
        if table is None:
            return ids
        if ids.size and (ids.min() < 0 or ids.max() >= len(table)):
            raise ValueError(f"{self.names[feature]}: ids must lie in [0, {len(table)}), the "
                             f"feature's cardinality; got [{ids.min()}, {ids.max()}]")
        return table[ids].reshape(-1).astype(np.int64)


# ------------------------------------------------------------------ rows and batches

_BAGS = pa.list_(pa.int64())  # the type list columns are read as


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _filled(column: Any, value: int) -> Any:
    return pc.fill_null(column, value) if column.null_count else column


@dataclass
class _Rows:
    """Rows in memory: numpy columns; a list (multi-hot) feature as a pyarrow list array."""

    labels: np.ndarray  # [n] float32
    dense: np.ndarray  # [n, dense features] float32
    sparse: list[Any]  # per feature: [n] int64 ids, or a list<int64> array of n bags

    def __len__(self) -> int:
        return len(self.labels)

    def slice(self, start: int, stop: int) -> _Rows:
        # numpy and pyarrow both slice without copying
        return _Rows(self.labels[start:stop], self.dense[start:stop],
                     [c[start:stop] for c in self.sparse])

    def take(self, index: np.ndarray) -> _Rows:
        arrow_index = pa.array(index)
        return _Rows(self.labels[index], self.dense[index],
                     [c[index] if isinstance(c, np.ndarray) else c.take(arrow_index)
                      for c in self.sparse])

    @staticmethod
    def concat(parts: list[_Rows]) -> _Rows:
        if len(parts) == 1:
            return parts[0]
        return _Rows(np.concatenate([p.labels for p in parts]),
                     np.concatenate([p.dense for p in parts]),
                     [np.concatenate(cs) if isinstance(cs[0], np.ndarray) else pa.concat_arrays(cs)
                      for cs in zip(*(p.sparse for p in parts), strict=True)])


def _to_batch(rows: _Rows, keys: Sequence[str], multi_hot: MultiHot | None = None) -> Batch:
    """The Batch of ``rows``: KJT values feature-major under ``keys`` (the categorical
    features' names), one bag per row and feature."""
    n = len(rows)
    values: list[np.ndarray] = []
    lengths: list[np.ndarray | int] = []
    for f, column in enumerate(rows.sparse):
        if isinstance(column, np.ndarray):
            size = multi_hot.sizes[f] if multi_hot is not None else 1
            values.append(multi_hot.expand(f, column) if size > 1 else column)
            lengths.append(size)
        else:
            flat = column.flatten()  # respects the slice offset and skips null bags
            values.append(_filled(flat, MISSING_ID).to_numpy())
            lengths.append(_filled(pc.list_value_length(column), 0).to_numpy())
    if all(isinstance(x, int) and x == 1 for x in lengths):
        lengths_array = np.ones(n * len(lengths), np.int32)  # the one-hot fast path
    else:
        lengths_array = np.concatenate(
            [np.full(n, x, np.int32) if isinstance(x, int) else x.astype(np.int32)
             for x in lengths])
    values_array = np.concatenate(values).astype(np.int64, copy=False)
    return Batch(
        dense_features=torch.from_numpy(rows.dense),
        sparse_features=KeyedJaggedTensor.from_lengths_sync(
            keys=list(keys), values=torch.from_numpy(values_array),
            lengths=torch.from_numpy(lengths_array)),
        labels=torch.from_numpy(rows.labels),
    )


def make_batch(labels: np.ndarray, dense: np.ndarray, sparse: np.ndarray,
               keys: Sequence[str] = CRITEO.sparse) -> Batch:
    """Builds a Batch from ``labels [B]``, ``dense [B, D]`` and ``sparse ids [B, F]`` (the
    F features named by ``keys``).

    One id per row and feature, so every KJT length is 1 and the values are the ids
    feature-major, as KeyedJaggedTensor lays them out.
    """
    rows = _Rows(labels.astype(np.float32), np.ascontiguousarray(dense, dtype=np.float32),
                 list(sparse.T))
    return _to_batch(rows, keys)


def _shuffle(blocks: Iterator[_Rows], buffer: int, rng: np.random.Generator) -> Iterator[_Rows]:
    """The rows of ``blocks`` in random order, through a pool of ``buffer`` rows.

    Blocks (row groups) enter the pool whole. Whenever it holds at least 1.5 × ``buffer``
    rows, all but ``buffer`` of them leave, drawn uniformly at random from the whole pool;
    what is left when the input ends leaves in random order. Each emission copies the pool
    once, so the cost per row is a small constant; memory is ~1.5 × ``buffer`` rows plus a
    row group.
    """
    pool: list[_Rows] = []
    have, enough = 0, max(1, buffer // 2)
    for block in blocks:
        pool.append(block)
        have += len(block)
        surplus = have - buffer
        if surplus < enough:
            continue
        rows, order = _Rows.concat(pool), rng.permutation(have)
        yield rows.take(order[:surplus])
        pool, have = [rows.take(order[surplus:])], buffer
    if have:
        yield _Rows.concat(pool).take(rng.permutation(have))


def _columns(features: Features) -> list[str]:
    return [features.label, *features.dense, *features.sparse]


def _list_features(segments: list[Segment], features: Features) -> list[bool]:
    """Which sparse columns hold bags (list<int>) rather than ids, from the first file."""
    if not segments:
        return [False] * len(features.sparse)
    path = segments[0].path
    schema = pq.read_schema(path)
    missing = [c for c in _columns(features) if c not in schema.names]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(missing)}")
    kinds = []
    for name in features.sparse:
        t = schema.field(name).type
        if _is_list(t) and pa.types.is_integer(t.value_type):
            kinds.append(True)
        elif pa.types.is_integer(t):
            kinds.append(False)
        else:
            raise ValueError(f"{path}: column {name} is {t}; expected integer ids or a list "
                             "of integer ids")
    return kinds


# ------------------------------------------------------------------ background prefetch

_END = object()


@dataclass
class _Failure:
    error: BaseException


def _produce_into(produce: Callable[[], Iterator[Batch]], out: queue.Queue,
                  stop: threading.Event) -> None:
    """The prefetch thread: puts batches, then _END or the error; quits when ``stop`` is set.

    It holds no reference to the consumer's iterator, so dropping that iterator is what
    stops it (see :class:`_Prefetcher`).
    """

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    items = None
    try:
        items = produce()
        for item in items:
            if not put(item):
                return
        put(_END)
    except BaseException as e:  # handed over, raised in the consumer
        put(_Failure(e))
    finally:
        if items is not None:
            items.close()  # closes the open Parquet file when stopped early


class _Prefetcher(Iterator[Batch]):
    """Iterator over batches made by a background thread, at most ``depth`` ahead.

    The producer's exception is raised here, in the consumer. Stopping early (``close()``,
    or dropping the iterator as ``itertools.islice`` or a ``break`` does) stops the thread
    at its next batch.
    """

    def __init__(self, produce: Callable[[], Iterator[Batch]], depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self.thread = threading.Thread(target=_produce_into, name="ParquetBatches-prefetch",
                                       args=(produce, self._queue, self._stop), daemon=True)
        self.thread.start()
        _LIVE.add(self)

    def __next__(self) -> Batch:
        if self._done:
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.thread.is_alive() and self._queue.empty():
                    self._done = True
                    raise RuntimeError("the prefetch thread ended without a result") from None
        if item is _END or isinstance(item, _Failure):
            self._done = True
            self.thread.join()
            if isinstance(item, _Failure):
                raise item.error
            raise StopIteration
        return item

    def close(self, timeout: float | None = None) -> None:
        """Stops the producer and waits (at most ``timeout`` seconds) for it to end."""
        self._shutdown()
        self.thread.join(timeout)

    def _shutdown(self) -> None:
        self._done = True
        self._stop.set()
        while True:  # free the batches made ahead
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break

    def __del__(self) -> None:
        if hasattr(self, "_stop"):
            self._shutdown()  # no join: the thread ends by itself at its next batch


_LIVE: weakref.WeakSet[_Prefetcher] = weakref.WeakSet()


@atexit.register
def _stop_prefetchers() -> None:
    """Ends every prefetch thread before the interpreter finalizes. A daemon thread still
    running then is cut off where it stands, and if that is inside pyarrow's C++ code the
    process aborts ("terminate called without an active exception") after a clean run."""
    for prefetcher in list(_LIVE):
        prefetcher.close(timeout=30)


# ------------------------------------------------------------------ the loader


class ParquetBatches:
    """Iterable of Batch over this rank's part of a split.

    Args:
        segments: the split (see :func:`resolve_split`).
        batch_size: rows per batch on this rank.
        rank, world_size: global rank and number of ranks.
        pad: evaluation mode (see module doc).
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
        cardinalities: ids per feature (``manifest["cardinalities"]``); needed with
            ``multi_hot_sizes``.
        multi_hot_seed: seed of the multi-hot tables; 0 gives MLPerf's.
        features: the dataset's columns (``Features.of(manifest)``): the label, the dense
            features (the batch's dense tensor, in this order) and the categorical ones
            (the KJT's keys, in this order).
        finish: applied to each batch by the thread that makes it (the prefetch thread,
            if any), e.g. ``Batch.pin_memory`` for a GPU: the pipeline's asynchronous copy
            to the device is only asynchronous from page-locked memory.

    A sparse column may hold one id per row (integers: the one-hot fast path) or a bag
    of ids (``list<int>``: KJT lengths are the list sizes, a null list an empty bag);
    both kinds may be mixed. Padding rows get id ``MISSING_ID``, a bag ``[MISSING_ID]``
    in a list column.

    Example::

        batches = ParquetBatches(resolve_split(d, m, ["day_0"]), 512, rank=0, world_size=2)
        for batch in batches:  # len(batches) batches, identical count on every rank
            ...
    """

    def __init__(self, segments: list[Segment], batch_size: int, rank: int, world_size: int,
                 pad: bool = False, *, shuffle_buffer: int = 0, seed: int = 0, epoch: int = 0,
                 prefetch: int = 4, multi_hot_sizes: Sequence[int] = (),
                 cardinalities: Sequence[int] | None = None, multi_hot_seed: int = 0,
                 features: Features = CRITEO,
                 finish: Callable[[Batch], Batch] | None = None) -> None:
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
        self.segments = _take(segments, lo, lo + self.rows)
        self.features = features
        self._list_features = _list_features(segments, features)
        self.multi_hot: MultiHot | None = None
        if multi_hot_sizes:
            if cardinalities is None:
                raise ValueError("multi_hot_sizes needs the cardinality of every feature "
                                 "(the manifest's cardinalities)")
            self.multi_hot = MultiHot(multi_hot_sizes, cardinalities, multi_hot_seed,
                                      features.sparse)
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
        return _Prefetcher(produce, self.prefetch) if self.prefetch else produce()

    def _produce(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        """The batches of one epoch (run by the prefetch thread, if any)."""
        chunks: Iterator[tuple[Path, int, int, int]] = self._chunks()
        if self.shuffle_buffer:
            rng = np.random.default_rng([self.seed, epoch, self.rank])
            pieces = list(chunks)
            chunks = iter([pieces[i] for i in rng.permutation(len(pieces))])
            blocks = _shuffle(self._read(chunks), self.shuffle_buffer, rng)
        else:
            blocks = self._read(chunks)
        for i, rows in enumerate(self._batches(blocks)):
            if i >= skip:  # skipped batches are read (the shuffle order needs them), not built
                batch = _to_batch(rows, self.features.sparse, self.multi_hot)
                yield self.finish(batch) if self.finish else batch

    def _chunks(self) -> Iterator[tuple[Path, int, int, int]]:
        """(file, row group, start, stop) of each piece of this rank's part, in order."""
        for seg in self.segments:
            meta = pq.read_metadata(seg.path)
            offset = 0
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                s, e = max(seg.start - offset, 0), min(seg.stop - offset, n)
                offset += n
                if s < e:
                    yield seg.path, g, s, e
                if offset >= seg.stop:
                    break

    def _read(self, chunks: Iterator[tuple[Path, int, int, int]]) -> Iterator[_Rows]:
        columns = _columns(self.features)
        file, open_path = None, None
        try:
            for path, g, s, e in chunks:
                if path != open_path:
                    if file is not None:
                        file.close()
                    file, open_path = pq.ParquetFile(path), path
                # On the calling thread: no Arrow thread pool, whose threads could still be
                # alive when the process exits and abort it (apache/arrow#34314); one core
                # a rank gains nothing from them, and the prefetch thread overlaps reads.
                group = file.read_row_group(g, columns=columns, use_threads=False)
                yield self._rows(group.slice(s, e - s), path)
        finally:
            if file is not None:
                file.close()

    def _rows(self, table: pa.Table, path: Path) -> _Rows:
        labels = table.column(self.features.label).to_numpy().astype(np.float32)
        dense = np.stack([_filled(table.column(c), 0).to_numpy() for c in self.features.dense],
                         axis=1) if self.features.dense else np.zeros((len(labels), 0))
        for name, mean, std in self.features.standardize:  # the manifest's training stats
            j = self.features.dense.index(name)
            dense[:, j] = (dense[:, j] - mean) / std
        sparse: list[Any] = []
        for name, is_list in zip(self.features.sparse, self._list_features, strict=True):
            column = table.column(name)
            if _is_list(column.type) != is_list:
                raise ValueError(f"{path}: column {name} is {column.type}, but "
                                 f"{'a list' if is_list else 'an integer'} column in the "
                                 "split's first file")
            if is_list:
                bags = column.combine_chunks()
                sparse.append(bags if bags.type == _BAGS else bags.cast(_BAGS))
            else:
                sparse.append(_filled(column, MISSING_ID).to_numpy().astype(np.int64, copy=False))
        return _Rows(labels, dense.astype(np.float32, copy=False), sparse)

    def _batches(self, blocks: Iterator[_Rows]) -> Iterator[_Rows]:
        """Cuts the blocks into ``num_batches`` batches; in evaluation, pads the last ones."""
        b, pending, have, emitted = self.batch_size, [], 0, 0

        def padded() -> Iterator[_Rows]:
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
            rows, start = _Rows.concat(pending), 0
            while have - start >= b and emitted < self.num_batches:
                yield rows.slice(start, start + b)
                start += b
                emitted += 1
            pending, have = ([rows.slice(start, have)] if start < have else []), have - start
            if emitted == self.num_batches:
                return

    def _padding(self, n: int) -> _Rows:
        ids = np.full(n, MISSING_ID, np.int64)
        bags = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), pa.array(ids))
        return _Rows(np.full(n, PAD_LABEL, np.float32),
                     np.zeros((n, len(self.features.dense)), np.float32),
                     [bags if is_list else ids for is_list in self._list_features])

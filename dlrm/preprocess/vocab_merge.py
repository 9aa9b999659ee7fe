"""Vocabularies from the chunks' value counts, in memory bounded by a budget.

Each chunk's counts lie on disk sorted by value, in one or more runs: counting spills a
run whenever the counts it holds outgrow its share of the budget (``write_run``). A
feature's values are cut into *partitions*, ranges of values, as many as the budget needs
for the counted entries; one partition at a time (a process per partition, each with its
share of the budget) gathers its slice of every run, sums the counts of equal values and
keeps those seen ``min_frequency`` times. Each partition's result is a file, written
atomically, so a killed merge resumes at the partitions not yet done.

The vocabulary orders values by descending count, ties by ascending value, and keeps at
most ``max_vocab``. Because partitions are ranges of values, that order needs no merge:
a value's id is the number of values counted more often, plus those counted as often in
earlier partitions, plus its rank within its partition, and the histogram of counts says
each. The vocabulary and its lookup table are written into memory-mapped files. The
result is the same vocabulary, id for id, whatever the budget.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dlrm.rows.layout import Layout
from dlrm.rows.vocab import Encoding, compact, fill_table, table_paths, table_slots
from dlrm.utils.files import atomic_path, atomic_write_json
from dlrm.utils.heap import release_freed_memory
from dlrm.utils.host import memory_bytes

ENTRY_BYTES = 96  # peak bytes per counted (value, count) entry while a partition merges
TABLE_BATCH_BYTES = 64  # peak bytes per value inserted into a lookup table at a time
SAMPLE = 1 << 20  # values sampled per feature to place the partition bounds
COUNTS, VOCAB, TABLES = "counts", "vocab", "tables"


def budget_bytes(memory_gib: float | None) -> int:
    """The memory budget of counting and merging, all workers together: ``memory_gib``, or
    a quarter of this host's memory (as its cgroup allows)."""
    return int(memory_gib * 2**30) if memory_gib else memory_bytes() // 4


def write_run(work: Path, key: str, run: int,
              counts: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, list[int]]:
    """One run of a chunk's counts: (values sorted ascending, counts) per feature, as two
    flat .npy files; returns each feature's offsets in them."""
    values = np.concatenate([v for v, _ in counts.values()] or [np.zeros(0, np.uint64)])
    n = np.concatenate([c for _, c in counts.values()] or [np.zeros(0, np.int64)])
    for name, array in (("values", values.astype(np.uint64)), ("counts", n.astype(np.int64))):
        with atomic_path(work / COUNTS / f"{key}.{run}.{name}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, array)
    ends = np.cumsum([v.size for v, _ in counts.values()]).tolist()
    return {c: [end - v.size, end] for (c, (v, _)), end in zip(counts.items(), ends, strict=True)}


def mark_counted(work: Path, key: str, runs: list[dict[str, list[int]]]) -> None:
    """The mark that a chunk's counts are complete: its runs' offsets, written last."""
    atomic_write_json(counts_mark(work, key), {"runs": runs})


def counts_mark(work: Path, key: str) -> Path:
    return work / COUNTS / f"{key}.json"


class _Counts:
    """One run of one chunk's counts of one feature, memory-mapped: ``values`` ascending,
    ``counts``."""

    def __init__(self, work: Path, key: str, run: int, span: list[int]):
        start, end = span
        stem = work / COUNTS / f"{key}.{run}"
        self.values = np.load(f"{stem}.values.npy", mmap_mode="r")[start:end]
        self.counts = np.load(f"{stem}.counts.npy", mmap_mode="r")[start:end]

    def between(self, lo: int | None, hi: int | None) -> tuple[np.ndarray, np.ndarray]:
        i = 0 if lo is None else int(np.searchsorted(self.values, np.uint64(lo)))
        j = self.values.size if hi is None else int(np.searchsorted(self.values, np.uint64(hi)))
        return np.array(self.values[i:j]), np.array(self.counts[i:j])


def runs_of(work: Path, key: str) -> list[dict[str, list[int]]]:
    return json.loads(counts_mark(work, key).read_text())["runs"]


def _counted(work: Path, keys: list[str], feature: str) -> list[_Counts]:
    """Every run of every chunk's counts of ``feature``."""
    return [_Counts(work, k, r, spans[feature])
            for k in keys for r, spans in enumerate(runs_of(work, k))]


def plan_partitions(work: Path, keys: list[str], names: tuple[str, ...],
                    encodings: tuple[Encoding, ...], budget: int) -> list[tuple[Any, ...]]:
    """Every vocab feature's partitions as jobs ``(feature, index, lo, hi)``, enough that
    one partition's entries fit ``budget``. The bounds are quantiles of a sample of the
    counted values, kept in the work directory so that a resumed run cuts the same way."""
    jobs = []
    for c, enc in zip(names, encodings, strict=True):
        if enc.type != "vocab":
            continue
        path = work / VOCAB / c / "bounds.npy"
        if not path.exists():
            chunks = _counted(work, keys, c)
            entries = sum(x.values.size for x in chunks)
            parts = max(1, math.ceil(entries * ENTRY_BYTES / budget))
            stride = max(1, entries // SAMPLE)
            sample = np.sort(np.concatenate([x.values[::stride] for x in chunks]
                                            + [np.zeros(0, np.uint64)]))
            bounds = np.unique(sample[(sample.size * np.arange(1, parts)) // parts])
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, bounds.astype(np.uint64))
        edges = [None, *np.load(path).tolist(), None]
        jobs += [(c, p, lo, hi) for p, (lo, hi) in enumerate(
            zip(edges[:-1], edges[1:], strict=True))]
    return jobs


def partition_path(work: Path, feature: str, index: int) -> Path:
    return work / VOCAB / feature / f"{index:05d}.npz"


def merge_partition(job: tuple[Any, ...], work: str, keys: list[str],
                    encodings: dict[str, Encoding], progress: Any) -> None:
    """One partition: its slice of every run of every chunk's counts, summed, the values seen
    ``min_frequency`` times kept (values ascending, their counts), written atomically."""
    c, p, lo, hi = job
    values, counts = compact([x.between(lo, hi) for x in _counted(Path(work), keys, c)])
    keep = counts >= encodings[c].min_frequency
    with atomic_path(partition_path(Path(work), c, p)) as tmp:
        np.savez(tmp, values=values[keep], counts=counts[keep])
    del values, counts, keep
    release_freed_memory()  # the worker's next job is another partition, or the shards


def vocab_path(work: Path, feature: str) -> Path:
    return work / VOCAB / f"{feature}.npy"


def counted_path(work: Path, feature: str) -> Path:
    """A growing feature's new values in the order of their counts (before the old
    vocabulary's values are taken out)."""
    return work / VOCAB / f"{feature}.counted.npy"


def order_feature(job: tuple[str, int], work: str, encodings: dict[str, Encoding],
                  budget: int, parent: str | None, progress: Any) -> None:
    """A feature's vocabulary from its ``parts`` partitions (``job``: the two), in id
    order, then its lookup table (the ids file last: the mark that the feature is done).
    ``parent`` (``--grow``): a vocabulary file whose values keep their ids, the counted
    ones it lacks appended in their order, within ``max_vocab`` in all."""
    (feature, parts), wd = job, Path(work)
    max_vocab = encodings[feature].max_vocab
    old = None
    if parent is not None:
        with np.load(parent) as z:
            old = z[feature]

    def partition(p: int) -> tuple[np.ndarray, np.ndarray]:
        with np.load(partition_path(wd, feature, p)) as z:
            return z["values"], z["counts"]

    # How many values each count has, over all partitions: counts descending.
    classes, sizes = compact([np.unique(partition(p)[1], return_counts=True)
                              for p in range(parts)])
    classes, sizes = classes[::-1].astype(np.int64), sizes[::-1]
    size = int(sizes.sum()) if not max_vocab or old is not None else min(int(sizes.sum()),
                                                                          max_vocab)
    first = np.cumsum(sizes) - sizes  # the first id (less 2) of each count
    ordered = vocab_path(wd, feature) if old is None else counted_path(wd, feature)
    with _new_npy(ordered, np.uint64, size) as vocab:
        for p in range(parts):
            values, counts = partition(p)
            order = np.argsort(-counts, kind="stable")  # by count, values still ascending
            counts = counts[order]
            cls = np.searchsorted(-classes, -counts)
            rank = np.arange(counts.size) - np.searchsorted(-counts, -counts)
            at = first[cls] + rank
            first += np.bincount(cls, minlength=classes.size)
            kept = at < size
            vocab[at[kept]] = values[order][kept]
    vocab = np.load(ordered, mmap_mode="r")
    if old is not None:
        new = vocab[~np.isin(vocab, old)]
        room = max(0, max_vocab - old.size) if max_vocab else new.size
        with _new_npy(vocab_path(wd, feature), np.uint64, old.size + min(room, new.size)
                      ) as grown:
            grown[:old.size] = old
            grown[old.size:] = new[:room]
        del new
        vocab = np.load(vocab_path(wd, feature), mmap_mode="r")
    write_table(wd, feature, vocab, budget)


def write_vocabulary(work: Path, feature: str, values: np.ndarray, budget: int) -> None:
    """A feature's vocabulary ``values`` (in id order) as its file, then its lookup table."""
    with _new_npy(vocab_path(work, feature), np.uint64, values.size) as vocab:
        vocab[:] = values
    write_table(work, feature, np.load(vocab_path(work, feature), mmap_mode="r"), budget)


def write_table(work: Path, feature: str, vocab: np.ndarray, budget: int) -> None:
    """The lookup table of a feature's vocabulary; its ids file, written last, is the mark
    that the feature is done."""
    keys_path, ids_path = table_paths(work / TABLES, feature)
    slots = table_slots(vocab.size)
    with (_new_npy(keys_path, np.uint64, slots) as keys,
          _new_npy(ids_path, np.int32, slots, -1) as ids):
        fill_table(vocab, keys, ids, max(4096, budget // TABLE_BATCH_BYTES))
    release_freed_memory()


@contextlib.contextmanager
def _new_npy(path: Path, dtype: Any, size: int, fill: int = 0) -> Iterator[np.ndarray]:
    """A new .npy file of ``size`` elements (each ``fill``), mapped for writing; in place
    once the block succeeds."""
    with atomic_path(path) as tmp:
        if not size:  # an empty file cannot be mapped
            yield np.zeros(0, dtype)
            np.save(tmp, np.zeros(0, dtype))
            return
        array = np.lib.format.open_memmap(tmp, "w+", dtype, (size,))
        if fill:
            array[:] = fill
        yield array
        array.flush()
        del array


def merge_vocabularies(run: Callable[[Callable, list, tuple], None], keys: list[str],
                       work: Path, layout: Layout, budget: int, log: Callable[[str], Any],
                       parent: Path | None = None) -> dict[str, np.ndarray]:
    """Every vocab feature's vocabulary (mapped from its file) and lookup table from the
    counts of the chunks ``keys``, each process within ``budget`` bytes; ``parent``
    (``--grow``): the vocabularies they extend (see :func:`order_feature`). ``run(fn, jobs,
    args)`` runs ``fn(job, *args, None)`` for every job on the worker pool."""
    jobs = plan_partitions(work, keys, layout.sparse, layout.encodings, budget)
    runs = sum(len(runs_of(work, k)) for k in keys)
    log(f"preprocess: merging the counts ({runs} runs of {len(keys)} chunks) in {len(jobs)} "
        f"partitions ({budget / 2**20:.1f} MiB each process)")
    encodings = dict(zip(layout.sparse, layout.encodings, strict=True))
    run(merge_partition, [j for j in jobs if not partition_path(work, j[0], j[1]).exists()],
        (str(work), keys, encodings))
    parts = Counter(j[0] for j in jobs)
    run(order_feature, [(c, n) for c, n in parts.items()
                        if not table_paths(work / TABLES, c)[1].exists()],
        (str(work), encodings, budget, None if parent is None else str(parent)))
    return {c: np.load(vocab_path(work, c), mmap_mode="r") for c in parts}

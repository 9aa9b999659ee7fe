"""Parquet dataset → Batch: layout of one batch worked out by hand, rank partitions, splits;
list (multi-hot) columns, shuffle, background prefetch, MLPerf multi-hot expansion."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import math
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import REPO, quiet, tsv_row, write_lines
from torchrec.datasets.utils import Batch

from dlrm.config import ModelConfig, load_config
from dlrm.data.batches import make_batch
from dlrm.data.loader import PAD_LABEL, ParquetBatches
from dlrm.data.multi_hot import MultiHot
from dlrm.errors import ConfigError, DataError
from dlrm.preprocess.driver import preprocess
from dlrm.schema.declared import load_schema
from dlrm.schema.features import (
    DENSE_NAMES,
    LABEL,
    MISSING_ID,
    NUM_DENSE,
    NUM_SPARSE,
    SPARSE_NAMES,
    holdout_halves,
)
from dlrm.schema.splits import Segment, default_split_specs, resolve_split
from dlrm.train.model import build_model

CRITEO = load_schema("criteo").features()  # the columns of the Parquet files written here

# ------------------------------------------------------------------ hand-checked dataset
# Two sources, d0 (5 rows) and d1 (2 rows); the vocabulary is counted over both
# (--vocab-from '*': this dataset checks the loader, not which rows are counted).
#
# C1: 0a ×3, 0b ×2, ff ×1                → 0a = 2, 0b = 3, ff = 4 (descending count)
# C2: 0f ×2, 10 ×2, abc ×1, ffffffff ×1  → 0f = 2, 10 = 3 (tie: smaller value first),
#                                          abc = 4, ffffffff = 5
# C3..C26: "1" (id 2), or missing (id 0) where (feature index + row) % 4 == 0.
C1 = {"d0": ["0a", "0b", "0a", "", "ff"], "d1": ["0b", "0a"]}
C2 = {"d0": ["10", "0f", "10", "0f", "ffffffff"], "d1": ["", "abc"]}
C1_IDS = [2, 3, 2, MISSING_ID, 4]
C2_IDS = [3, 2, 3, 2, 5]
LABELS = [1, 0, 0, 1, 1]
DENSE = [[str(NUM_DENSE * r + j) for j in range(NUM_DENSE)] for r in range(5)]
DENSE[0][0] = ""  # missing → 0
DENSE[1][1] = "-3"  # negative → 0


def _other_cat(f: int, r: int) -> str:
    return "" if (f + r) % 4 == 0 else "1"


def _expected_ids(r: int) -> list[int]:
    """Ids of d0's row r, C1..C26."""
    return [C1_IDS[r], C2_IDS[r]] + [MISSING_ID if (f + r) % 4 == 0 else 2
                                     for f in range(2, NUM_SPARSE)]


def _expected_dense(r: int) -> np.ndarray:
    x = np.array([float(v) if v else 0.0 for v in DENSE[r]])
    return np.log1p(np.maximum(x, 0.0)).astype(np.float32)


@pytest.fixture(scope="module")
def hand_dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hand")
    d0 = [tsv_row(str(LABELS[r]), DENSE[r],
                  [C1["d0"][r], C2["d0"][r]] + [_other_cat(f, r) for f in range(2, NUM_SPARSE)])
          for r in range(5)]
    d1 = [tsv_row("0", None, [C1["d1"][r], C2["d1"][r]] + ["1"] * (NUM_SPARSE - 2))
          for r in range(2)]
    inputs = [write_lines(tmp / "d0.tsv", d0), write_lines(tmp / "d1.tsv", d1)]
    out = tmp / "dataset"
    manifest = preprocess(inputs, out, workers=1, log=quiet, vocab_from=["*"])
    return out, manifest


def test_first_batch_by_hand(hand_dataset):
    out, manifest = hand_dataset
    assert manifest.cardinalities[:2] == [5, 6]
    batches = ParquetBatches(resolve_split(out, manifest, ["d0"]), batch_size=2, rank=0,
                             world_size=1, features=manifest.features)
    assert len(batches) == 2  # 5 rows: two full batches, the last row left out
    batch = next(iter(batches))
    kjt = batch.sparse_features
    assert kjt.keys() == SPARSE_NAMES
    assert torch.equal(kjt.lengths(), torch.ones(NUM_SPARSE * 2, dtype=kjt.lengths().dtype))
    assert torch.equal(kjt.offsets().long(), torch.arange(0, NUM_SPARSE * 2 + 1))
    # Feature-major: C1 of rows 0 and 1, then C2 of rows 0 and 1, ...
    expected = [i for pair in zip(_expected_ids(0), _expected_ids(1), strict=True) for i in pair]
    assert kjt.values().tolist() == expected
    assert kjt.values()[:4].tolist() == [2, 3, 3, 2]  # C1 = 0a, 0b; C2 = 10, 0f
    assert kjt["C2"].values().tolist() == [3, 2]
    assert batch.dense_features.dtype == torch.float32
    np.testing.assert_array_equal(batch.dense_features.numpy(),
                                  np.stack([_expected_dense(0), _expected_dense(1)]))
    assert batch.dense_features[0, 0] == 0 and batch.dense_features[1, 1] == 0
    assert batch.labels.dtype == torch.float32
    assert batch.labels.tolist() == [1.0, 0.0]


def test_all_rows_by_hand_with_padding(hand_dataset):
    out, manifest = hand_dataset
    batches = list(ParquetBatches(resolve_split(out, manifest, ["d0"]), batch_size=2, rank=0,
                                  world_size=1, pad=True, features=manifest.features))
    assert len(batches) == 3
    labels = torch.cat([b.labels for b in batches]).tolist()
    assert labels == [*map(float, LABELS), PAD_LABEL]
    ids = torch.cat([b.sparse_features.values().view(NUM_SPARSE, 2).T for b in batches])
    assert ids[:5].tolist() == [_expected_ids(r) for r in range(5)]
    assert ids[5].tolist() == [MISSING_ID] * NUM_SPARSE
    dense = torch.cat([b.dense_features for b in batches]).numpy()
    np.testing.assert_array_equal(dense[:5], np.stack([_expected_dense(r) for r in range(5)]))
    assert not dense[5].any()


def test_make_batch_layout():
    labels = np.array([1, 0, 1], dtype=np.int8)
    dense = np.arange(3 * NUM_DENSE, dtype=np.float64).reshape(3, NUM_DENSE)
    sparse = np.arange(3 * NUM_SPARSE, dtype=np.int64).reshape(3, NUM_SPARSE)
    batch = make_batch(labels, dense, sparse, SPARSE_NAMES)
    kjt = batch.sparse_features
    assert kjt.keys() == SPARSE_NAMES
    assert kjt.lengths().tolist() == [1] * (3 * NUM_SPARSE)
    assert kjt.offsets().tolist() == list(range(3 * NUM_SPARSE + 1))
    assert kjt.values().tolist() == sparse.T.reshape(-1).tolist()
    for f, name in enumerate(SPARSE_NAMES):
        assert kjt[name].values().tolist() == sparse[:, f].tolist()
    assert batch.dense_features.dtype == torch.float32
    assert batch.dense_features.tolist() == dense.tolist()
    assert batch.labels.dtype == torch.float32
    assert batch.labels.tolist() == [1.0, 0.0, 1.0]


# --------------------------------------------------------------------- rank partitions
# 1001 rows over two sources (600 + 401). Row i has C1 = hex(i): every value is seen once,
# so ids follow the value order and id - 2 is the row number (every row counted:
# --vocab-from '*'); its label is i % 2 and I1 = i, so the columns of a row can be checked
# against each other.
DAY_ROWS = (600, 401)
TOTAL = sum(DAY_ROWS)
BATCH = 64


@pytest.fixture(scope="module")
def numbered_dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("numbered")
    inputs, start = [], 0
    for day, n in enumerate(DAY_ROWS):
        rows = [tsv_row(str(i % 2), [str(i)] + ["0"] * (NUM_DENSE - 1),
                        [f"{i:x}"] + ["1"] * (NUM_SPARSE - 1)) for i in range(start, start + n)]
        inputs.append(write_lines(tmp / f"day_{day}", rows))
        start += n
    out = tmp / "dataset"
    manifest = preprocess(inputs, out, workers=1, log=quiet, vocab_from=["*"])
    return out, manifest


def _rows(batches) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers and labels of every row yielded, pad rows included (row number -2)."""
    ids, labels = [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    for b in batches:
        n = b.labels.shape[0]
        assert n == batches.batch_size
        ids.append(b.sparse_features["C1"].values().numpy() - 2)
        labels.append(b.labels.numpy())
        # The columns of each row stay together.
        real = b.labels.numpy() != PAD_LABEL
        i = ids[-1][real]
        np.testing.assert_array_equal(b.labels.numpy()[real], i % 2)
        np.testing.assert_array_equal(b.dense_features.numpy()[real, 0],
                                      np.log1p(i.astype(np.float64)).astype(np.float32))
        pad = ~real
        assert not b.dense_features.numpy()[pad].any()
        assert (b.sparse_features.values().view(NUM_SPARSE, n).T.numpy()[pad] == MISSING_ID).all()
    return np.concatenate(ids), np.concatenate(labels)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_training_partition(numbered_dataset, world_size):
    out, manifest = numbered_dataset
    segments = resolve_split(out, manifest, ["day_0", "day_1"])
    ranks = [ParquetBatches(segments, BATCH, r, world_size, features=manifest.features)
             for r in range(world_size)]
    per_rank = (TOTAL // world_size) // BATCH
    assert [len(b) for b in ranks] == [per_rank] * world_size
    for rank, batches in enumerate(ranks):
        ids, labels = _rows(batches)
        assert ids.size == per_rank * BATCH  # exactly len() full batches
        assert (labels != PAD_LABEL).all()
        lo = rank * TOTAL // world_size  # each rank: the start of its contiguous part
        assert ids.tolist() == list(range(lo, lo + ids.size))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_evaluation_partition_sees_every_row_once(numbered_dataset, world_size):
    out, manifest = numbered_dataset
    segments = resolve_split(out, manifest, ["day_0", "day_1"])
    ranks = [ParquetBatches(segments, BATCH, r, world_size, pad=True,
                            features=manifest.features) for r in range(world_size)]
    per_rank = math.ceil(math.ceil(TOTAL / world_size) / BATCH)
    assert [len(b) for b in ranks] == [per_rank] * world_size
    seen = []
    for rank, batches in enumerate(ranks):
        ids, labels = _rows(batches)
        assert ids.size == per_rank * BATCH  # every rank yields the same number of batches
        real = ids[labels != PAD_LABEL]
        assert real.tolist() == list(range(rank * TOTAL // world_size,
                                           (rank + 1) * TOTAL // world_size))
        assert batches.rows == real.size
        seen.append(real)
    assert np.sort(np.concatenate(seen)).tolist() == list(range(TOTAL))


def test_batches_can_be_iterated_again(numbered_dataset):
    out, manifest = numbered_dataset
    batches = ParquetBatches(resolve_split(out, manifest, ["day_1"]), BATCH, 1, 2, pad=True,
                             features=manifest.features)
    first, _ = _rows(batches)
    again, _ = _rows(batches)
    np.testing.assert_array_equal(first, again)


# ------------------------------------------------------------------------------ splits


def _split_rows(out, manifest, spec: str) -> list[int]:
    segments = resolve_split(out, manifest, [spec])
    ids, labels = _rows(ParquetBatches(segments, 1000, 0, 1, pad=True,
                                       features=manifest.features))
    assert sum(s.stop - s.start for s in segments) == (labels != PAD_LABEL).sum()
    return ids[labels != PAD_LABEL].tolist()


def test_default_splits_are_the_holdout_halves(numbered_dataset):
    out, manifest = numbered_dataset
    specs = default_split_specs(manifest)
    assert specs == {"train": ["day_0"], "val": ["day_1[0:0.5]"], "test": ["day_1[0.5:1]"]}
    first = DAY_ROWS[0]
    (a, b), (c, d) = holdout_halves(DAY_ROWS[1])
    val = _split_rows(out, manifest, "day_1[0:0.5]")
    test = _split_rows(out, manifest, "day_1[0.5:1]")
    assert val == list(range(first + a, first + b))
    assert test == list(range(first + c, first + d))
    assert len(val) == 200 and len(test) == 201
    assert sorted(val + test) == _split_rows(out, manifest, "day_1")


@pytest.mark.parametrize(
    "spec, rows",
    [
        ("day_0", range(0, 600)),
        ("day_0[:]", range(0, 600)),
        ("day_0[0.25:0.75]", range(150, 450)),
        ("day_0[.1:]", range(60, 600)),
        ("day_1[0.5:0.5]", range(0)),
    ],
)
def test_fraction_specs(numbered_dataset, spec, rows):
    out, manifest = numbered_dataset
    assert _split_rows(out, manifest, spec) == list(rows)


def test_specs_span_sources(numbered_dataset):
    out, manifest = numbered_dataset
    segments = resolve_split(out, manifest, ["day_0[0.5:1]", "day_1[0:0.5]"])
    assert [(s.path.parent.name, s.start, s.stop) for s in segments] == [
        ("day_0", 300, 600), ("day_1", 0, 200)]


@pytest.mark.parametrize(
    "spec", ["day_9", "day_1[0.7:0.2]", "day_1[0:1.5]", "day_1[a:b]", "day_1[0.1.2:1]",
             "day_1[1/0:1]", "day_1[0:1", "[0:1]", ""],
)
def test_bad_specs_name_the_spec(numbered_dataset, spec):
    out, manifest = numbered_dataset
    with pytest.raises(ValueError, match=re.escape(repr(spec))):
        resolve_split(out, manifest, ["day_0", spec])


def test_single_source_splits_by_row_order_like_kaggle(numbered_dataset):
    """One source (Kaggle's train.txt): 6/7 train, then val and test halve the last 7th;
    no row in two splits, every row in one."""
    out, manifest = numbered_dataset
    one = dataclasses.replace(manifest, sources=manifest.sources[:1])  # day_0: rows 0..599
    specs = default_split_specs(one)
    rows = {split: _split_rows(out, one, spec) for split, (spec,) in specs.items()}
    assert rows["train"] == list(range(0, 514))  # floor(600 * 6/7)
    assert rows["val"] == list(range(514, 557))  # floor(600 * 13/14)
    assert rows["test"] == list(range(557, 600))


# ------------------------------------------------------------ hand-written Parquet files
# Written with pyarrow directly, so they may hold what preprocess never writes: list
# (multi-hot) columns, small row groups. Row i: label i % 2, I1 = i, C1 = i, C2 = the bag
# list(range(i, i + i % 4)) (a list column; sizes 0..3), C3..C26 = i % 7.


def _bag(i: int) -> list[int]:
    return list(range(i, i + i % 4))


def _write(path, rows: range, row_group_size: int = 50, **columns) -> Segment:
    """A Parquet file of ``rows`` (see above); ``columns`` replace some (pyarrow arrays)."""
    ids = np.arange(rows.start, rows.stop)
    data = {LABEL: pa.array((ids % 2).astype(np.int8))}
    data.update({c: pa.array(np.zeros(len(ids), np.float32)) for c in DENSE_NAMES})
    data["I1"] = pa.array(ids.astype(np.float32))
    data.update({c: pa.array(ids % 7) for c in SPARSE_NAMES})
    data["C1"] = pa.array(ids)
    data["C2"] = pa.array([_bag(i) for i in ids], type=pa.list_(pa.int64()))
    data.update(columns)
    pq.write_table(pa.table(data), path, row_group_size=row_group_size)
    return Segment(path, 0, len(ids))


GROUPED_ROWS = (300, 250, 181)  # three files of 50-row groups: 15 row groups


@pytest.fixture(scope="module")
def grouped(tmp_path_factory) -> list[Segment]:
    tmp, start, segments = tmp_path_factory.mktemp("grouped"), 0, []
    for k, n in enumerate(GROUPED_ROWS):
        segments.append(_write(tmp / f"f{k}.parquet", range(start, start + n)))
        start += n
    return segments


def _row_numbers(batches) -> list[int]:
    """Row numbers of every row yielded, checking that each row's columns stayed together."""
    out = []
    for b in batches:
        i = b.dense_features[:, 0].long()
        kjt = b.sparse_features
        assert b.labels.tolist() == (i % 2).float().tolist()
        assert kjt["C1"].values().tolist() == i.tolist()
        assert kjt["C26"].values().tolist() == (i % 7).tolist()
        assert [t.tolist() for t in kjt["C2"].to_dense()] == [_bag(r) for r in i.tolist()]
        out += i.tolist()
    return out


def test_list_columns_by_hand(tmp_path):
    c1 = pa.array([[5, 6], [], None, [7]], type=pa.list_(pa.int64()))  # None: an empty bag
    c2 = pa.array([[1], [2, 3, 4], [9], [0, 1]], type=pa.list_(pa.int32()))
    seg = _write(tmp_path / "bags.parquet", range(4), C1=c1, C2=c2,
                 **{f"C{f}": pa.array(np.arange(4) + 100 * f) for f in range(3, NUM_SPARSE + 1)})
    b0, b1 = ParquetBatches([seg], 2, rank=0, world_size=1, features=CRITEO)
    # Rows 0, 1 then rows 2, 3 (a slice in the middle of the arrays); feature-major.
    for batch, rows, c1_bags, c2_bags in [(b0, (0, 1), [[5, 6], []], [[1], [2, 3, 4]]),
                                          (b1, (2, 3), [[], [7]], [[9], [0, 1]])]:
        kjt = batch.sparse_features
        assert kjt.keys() == SPARSE_NAMES
        lengths = [len(x) for x in c1_bags + c2_bags] + [1, 1] * (NUM_SPARSE - 2)
        values = sum(c1_bags + c2_bags, []) + [100 * f + r for f in range(3, NUM_SPARSE + 1)
                                               for r in rows]
        assert kjt.lengths().tolist() == lengths
        assert kjt.offsets().tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
        assert kjt.values().tolist() == values
        assert kjt.values().dtype == torch.int64
        assert [t.tolist() for t in kjt["C1"].to_dense()] == c1_bags
        assert kjt["C3"].values().tolist() == [300 + r for r in rows]
        assert batch.labels.tolist() == [r % 2 for r in rows]


def test_list_columns_pad_with_missing_bags(tmp_path):
    seg = _write(tmp_path / "bags.parquet", range(4))
    batches = list(ParquetBatches([seg], 3, rank=0, world_size=1, pad=True, features=CRITEO))
    assert len(batches) == 2
    kjt = batches[1].sparse_features
    assert batches[1].labels.tolist() == [1.0, PAD_LABEL, PAD_LABEL]
    assert [t.tolist() for t in kjt["C2"].to_dense()] == [_bag(3), [MISSING_ID], [MISSING_ID]]
    assert kjt["C1"].values().tolist() == [3, MISSING_ID, MISSING_ID]


# ------------------------------------------------------------------------------ shuffle


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shuffle_keeps_each_ranks_rows_and_batch_count(grouped, world_size):
    in_order = [ParquetBatches(grouped, 32, r, world_size, features=CRITEO)
                for r in range(world_size)]
    shuffled = [ParquetBatches(grouped, 32, r, world_size, features=CRITEO, shuffle_buffer=100,
                               seed=7)
                for r in range(world_size)]
    counts = {len(b) for b in in_order + shuffled}
    assert counts == {(sum(GROUPED_ROWS) // world_size) // 32}  # the same on every rank
    for plain, mixed in zip(in_order, shuffled, strict=True):
        rows, again = _row_numbers(plain), _row_numbers(mixed)
        assert len(again) == len(plain) * 32
        assert sorted(again) == rows  # the same multiset of rows (no repeats, none swapped)
        assert again != rows
        assert _row_numbers(mixed) != again  # the next iteration: the next epoch's order


def test_shuffle_is_reproducible_per_seed_and_epoch(grouped):
    def order(seed: int, epoch: int, prefetch: int = 2) -> list[int]:
        return _row_numbers(ParquetBatches(grouped, 32, 1, 2, shuffle_buffer=64, seed=seed,
                                           epoch=epoch, prefetch=prefetch, features=CRITEO))

    assert order(1, 0) == order(1, 0, prefetch=0)
    assert order(1, 3) == order(1, 3)
    assert len({tuple(order(1, e)) for e in range(3)} | {tuple(order(2, 0))}) == 4
    batches = ParquetBatches(grouped, 32, 1, 2, shuffle_buffer=64, seed=1, features=CRITEO)
    first, second = _row_numbers(batches), _row_numbers(batches)
    assert (first, second) == (order(1, 0), order(1, 1))  # each iteration: the next epoch
    batches.set_epoch(0)
    assert _row_numbers(batches) == first


def test_shuffle_reorders_row_groups(grouped):
    # A one-row buffer mixes little across row groups: the 50-row groups show through,
    # in a shuffled order.
    rows = _row_numbers(ParquetBatches(grouped, 50, 0, 1, features=CRITEO, shuffle_buffer=1,
                                       seed=3))
    groups = list(dict.fromkeys(r // 50 for r in rows[::50]))
    assert len(groups) > 10 and groups != sorted(groups)


def test_a_buffer_larger_than_the_part_shuffles_it_whole(grouped):
    rows = _row_numbers(ParquetBatches(grouped, 100, 0, 1, shuffle_buffer=10**6, features=CRITEO))
    assert {r // 250 for r in rows[:100]} == {0, 1, 2}


# ----------------------------------------------------------------------------- prefetch


def _prefetch_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "ParquetBatches-prefetch"}


@pytest.mark.parametrize("shuffle_buffer", [0, 80])
def test_prefetch_gives_the_same_batches(grouped, shuffle_buffer):
    orders = [_row_numbers(ParquetBatches(grouped, 32, 0, 2, shuffle_buffer=shuffle_buffer,
                                          prefetch=p, features=CRITEO)) for p in (0, 1, 3)]
    assert orders[0] == orders[1] == orders[2]
    assert len(orders[0]) == (sum(GROUPED_ROWS) // 2) // 32 * 32


def test_prefetch_thread_ends_when_the_consumer_stops_early(grouped):
    before = _prefetch_threads()
    # 91 batches; the queue fills
    batches = ParquetBatches(grouped, 8, 0, 1, prefetch=2, features=CRITEO)
    # As train.py does: islice, then drop. (islice itself lets go of the iterator once
    # exhausted, so hold it here to see the thread alive first.)
    it = iter(batches)
    head = itertools.islice(it, 3)
    assert len(list(head)) == 3
    (thread,) = _prefetch_threads() - before
    assert thread.is_alive()  # blocked on the full queue
    del head, it
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()
    # A `break` out of a for loop drops the iterator as well; close() stops it at once.
    for _ in batches:
        break
    gc.collect()
    it = iter(batches)
    next(it)
    it.close()
    assert not it.thread.is_alive()
    with pytest.raises(StopIteration):
        next(it)
    for t in _prefetch_threads() - before:
        t.join(timeout=5)
    assert _prefetch_threads() == before


def test_prefetch_threads_end_before_the_interpreter_exits(grouped):
    """An iterator still held when the program ends: its thread is stopped and joined at
    exit, not cut off mid-read during finalization (which can abort the process)."""
    script = f"""
import atexit, threading
def report():  # registered first, so it runs after the loader's own exit hook
    alive = [t for t in threading.enumerate() if t.name == "ParquetBatches-prefetch"]
    print("alive at exit:", len(alive))
atexit.register(report)
from dlrm.data.loader import ParquetBatches
from dlrm.schema.splits import Segment
from dlrm.schema.declared import load_schema
segments = [Segment(p, a, b) for p, a, b in {[(str(g.path), g.start, g.stop) for g in grouped]!r}]
held = iter(ParquetBatches(segments, 8, 0, 1, prefetch=2,
                           features=load_schema("criteo").features()))
next(held)
print("alive before exit:", sum(t.name == "ParquetBatches-prefetch"
                                for t in threading.enumerate()))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["alive before exit: 1", "alive at exit: 0"]


def test_prefetch_thread_ends_after_the_last_batch(grouped):
    it = iter(ParquetBatches(grouped, 100, 0, 1, prefetch=2, features=CRITEO))
    assert sum(1 for _ in it) == 7
    assert not it.thread.is_alive()


@pytest.mark.parametrize("second_file, error, match", [
    (b"PAR1 this is not a Parquet file PAR1", DataError, r"b\.parquet: unreadable Parquet"),
    ("scalar C2", ValueError, "column C2 is int64, but a list column"),
])
def test_producer_error_surfaces_in_the_consumer(tmp_path, second_file, error, match):
    first = _write(tmp_path / "a.parquet", range(100))
    second = tmp_path / "b.parquet"
    if isinstance(second_file, bytes):
        second.write_bytes(second_file)
    else:
        _write(second, range(100, 200), C2=pa.array(np.arange(100)))
    before = _prefetch_threads()
    it = iter(ParquetBatches([first, Segment(second, 0, 100)], 50, 0, 1, prefetch=2,
                             features=CRITEO))
    assert [b.labels.shape[0] for b in (next(it), next(it))] == [50, 50]  # the first file
    with pytest.raises(error, match=match):
        next(it)
    assert not it.thread.is_alive() and _prefetch_threads() == before
    with pytest.raises(StopIteration):
        next(it)


# ---------------------------------------------------------------------------- multi-hot
# MLPerf DLRMv2's bag sizes (torchrec_dlrm's materialize_synthetic_multihot_dataset.py).
MLPERF_SIZES = [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1]


def test_multi_hot_expansion(numbered_dataset):
    out, manifest = numbered_dataset
    cards = manifest.cardinalities
    segments = resolve_split(out, manifest, ["day_0", "day_1"])
    one_hot = ParquetBatches(segments, BATCH, 1, 2, pad=True, features=manifest.features)
    multi = ParquetBatches(segments, BATCH, 1, 2, pad=True, multi_hot_sizes=MLPERF_SIZES,
                           cardinalities=cards, features=manifest.features)
    again = ParquetBatches(segments, BATCH, 1, 2, pad=True, multi_hot_sizes=MLPERF_SIZES,
                           cardinalities=cards, features=manifest.features)
    other_seed = ParquetBatches(segments, BATCH, 1, 2, pad=True, multi_hot_sizes=MLPERF_SIZES,
                                cardinalities=cards, multi_hot_seed=1,
                                features=manifest.features)
    assert len(multi) == len(one_hot)
    differs = False
    for b1, bm, ba, bo in zip(one_hot, multi, again, other_seed, strict=True):
        assert torch.equal(bm.labels, b1.labels) and torch.equal(bm.dense_features,
                                                                 b1.dense_features)
        kjt, ids = bm.sparse_features, b1.sparse_features
        assert kjt.keys() == SPARSE_NAMES
        assert kjt.lengths().tolist() == [s for s in MLPERF_SIZES for _ in range(BATCH)]
        for f, (name, size) in enumerate(zip(SPARSE_NAMES, MLPERF_SIZES, strict=True)):
            bags = kjt[name].values().view(BATCH, size)
            assert ((bags >= 0) & (bags < cards[f])).all()
            assert torch.equal(bags[:, 0], ids[name].values())  # first: the id itself
        assert torch.equal(kjt.values(), ba.sparse_features.values())  # deterministic
        differs |= not torch.equal(kjt.values(), bo.sparse_features.values())
    assert differs
    # Padding rows (and any missing value, id 0) are expanded like every id: 0 first.
    pad = bm.labels == PAD_LABEL
    assert pad.any()
    assert (kjt["C21"].values().view(BATCH, 100)[pad, 0] == MISSING_ID).all()


def test_multi_hot_tables_are_the_mlperf_reference():
    cards = [3 + 5 * f for f in range(NUM_SPARSE)]
    tables = MultiHot(MLPERF_SIZES, cards, names=SPARSE_NAMES).tables
    # torchrec_dlrm's Multihot.__make_multi_hot_indices_tables, dist_type="uniform".
    state = np.random.get_state()
    try:
        np.random.seed(0)
        reference = []
        for card, size in zip(cards, MLPERF_SIZES, strict=True):
            extra = np.random.randint(0, card, size=(card, size - 1))
            reference.append(np.concatenate((np.arange(card)[:, np.newaxis], extra), axis=-1))
    finally:
        np.random.set_state(state)
    for table, ref, size in zip(tables, reference, MLPERF_SIZES, strict=True):
        if size == 1:
            assert table is None  # the identity
        else:
            np.testing.assert_array_equal(table, ref)
    ids = np.array([0, 2, 1])
    np.testing.assert_array_equal(MultiHot(MLPERF_SIZES, cards, names=SPARSE_NAMES).expand(0, ids),
                                  reference[0][ids].reshape(-1))


def test_multi_hot_argument_errors(grouped, tmp_path):
    with pytest.raises(ValueError, match="cardinalit"):
        ParquetBatches(grouped, 8, 0, 1, multi_hot_sizes=[2] * NUM_SPARSE, features=CRITEO)
    with pytest.raises(ValueError, match="C2 is a list column"):
        ParquetBatches(grouped, 8, 0, 1, multi_hot_sizes=[2] * NUM_SPARSE,
                       cardinalities=[1000] * NUM_SPARSE, features=CRITEO)
    with pytest.raises(ValueError, match="26 ints"):
        MultiHot([2] * 3, [10] * NUM_SPARSE, names=SPARSE_NAMES)
    # C1 holds ids up to 99, more than a cardinality of 50 allows: the consumer hears it
    # (from the loader's check of every row group, before the multi-hot tables see them).
    seg = _write(tmp_path / "f.parquet", range(100), C2=pa.array(np.zeros(100, np.int64)))
    batches = ParquetBatches([seg], 50, 0, 1, multi_hot_sizes=[2] * NUM_SPARSE,
                             cardinalities=[50] * NUM_SPARSE, features=CRITEO)
    with pytest.raises(DataError, match=r"f\.parquet: feature C1 has id 50 \(row 50 of the "
                                        r"file; 50 such ids here\) outside its table of 50"):
        list(batches)


def test_the_model_takes_multi_hot_batches(grouped):
    # EmbeddingBagCollection sum-pools each bag, whatever its length (here 0 to 3 in C2).
    cards = [1000] * NUM_SPARSE
    cfg = ModelConfig(embedding_dim=8, dense_arch_layer_sizes=[8], over_arch_layer_sizes=[4, 1])
    model = build_model(cfg, CRITEO, cards, torch.device("cpu"), torch.device("cpu"))
    sizes = [1, 1] + [3] * (NUM_SPARSE - 2)
    batch = next(iter(ParquetBatches(grouped, 16, 0, 1, multi_hot_sizes=sizes,
                                     cardinalities=cards, features=CRITEO)))
    loss, (_, logits, _) = model(batch)
    loss.backward()
    assert logits.shape == (16,) and torch.isfinite(loss)


# ------------------------------------------------------------------------------ config


def test_loader_config_keys():
    config = load_config(None, ["--data.path=d"])
    assert (config.data.shuffle_buffer, config.data.prefetch, config.data.multi_hot_sizes) == (
        0, 4, [])
    config = load_config(None, ["--data.path=d", "--data.shuffle_buffer=1000",
                                "--data.shuffle_seed=3", "--data.prefetch=0",
                                f"--data.multi_hot_sizes={MLPERF_SIZES}"])
    assert config.data.multi_hot_sizes == MLPERF_SIZES and config.data.shuffle_buffer == 1000
    for override, key in [("--data.shuffle_buffer=-1", "data.shuffle_buffer"),
                          ("--data.shuffle_seed=-1", "data.shuffle_seed"),
                          ("--data.prefetch=-1", "data.prefetch"),
                          (f"--data.multi_hot_sizes={[0] * NUM_SPARSE}", "data.multi_hot_sizes"),
                          ("--data.multi_hot_seed=-1", "data.multi_hot_seed")]:
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(None, ["--data.path=d", override])


@pytest.mark.parametrize("prefetch, thread", [(2, "ParquetBatches-prefetch"), (0, "MainThread")])
def test_finish_runs_on_each_batch_in_the_thread_that_makes_it(grouped, prefetch, thread):
    """What a GPU run pins (``Batch.pin_memory``) is pinned off the training thread."""
    seen = []

    def finish(batch):
        seen.append(threading.current_thread().name)
        return Batch(batch.dense_features * 2, batch.sparse_features, batch.labels)

    plain = list(ParquetBatches(grouped, 32, 0, 2, prefetch=prefetch, features=CRITEO))
    finished = list(ParquetBatches(grouped, 32, 0, 2, prefetch=prefetch, finish=finish,
                                   features=CRITEO))
    assert seen == [thread] * len(plain) and len(plain) > 1
    for a, b in zip(plain, finished, strict=True):
        assert torch.equal(b.dense_features, a.dense_features * 2)

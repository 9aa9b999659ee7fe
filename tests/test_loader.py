"""Parquet dataset → Batch: layout of one batch worked out by hand, rank partitions, splits."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from helpers import quiet, tsv_row, write_lines

from dlrm.data.loader import (
    PAD_LABEL,
    ParquetBatches,
    default_split_specs,
    make_batch,
    resolve_split,
)
from dlrm.data.preprocess import preprocess
from dlrm.data.schema import MISSING_ID, NUM_DENSE, NUM_SPARSE, SPARSE_NAMES, holdout_halves

# ------------------------------------------------------------------ hand-checked dataset
# Two sources, d0 (5 rows) and d1 (2 rows); the vocabulary is counted over both.
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
    manifest = preprocess(inputs, out, workers=1, log=quiet)
    return out, manifest


def test_first_batch_by_hand(hand_dataset):
    out, manifest = hand_dataset
    assert manifest["cardinalities"][:2] == [5, 6]
    batches = ParquetBatches(resolve_split(out, manifest, ["d0"]), batch_size=2, rank=0,
                             world_size=1)
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
                                  world_size=1, pad=True))
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
    batch = make_batch(labels, dense, sparse)
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
# so ids follow the value order and id - 2 is the row number; its label is i % 2 and
# I1 = i, so the columns of a row can be checked against each other.
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
    manifest = preprocess(inputs, out, workers=1, log=quiet)
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
    ranks = [ParquetBatches(segments, BATCH, r, world_size) for r in range(world_size)]
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
    ranks = [ParquetBatches(segments, BATCH, r, world_size, pad=True)
             for r in range(world_size)]
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
    batches = ParquetBatches(resolve_split(out, manifest, ["day_1"]), BATCH, 1, 2, pad=True)
    first, _ = _rows(batches)
    again, _ = _rows(batches)
    np.testing.assert_array_equal(first, again)


# ------------------------------------------------------------------------------ splits


def _split_rows(out, manifest, spec: str) -> list[int]:
    segments = resolve_split(out, manifest, [spec])
    ids, labels = _rows(ParquetBatches(segments, 1000, 0, 1, pad=True))
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
             "day_1[1/3:1]", "day_1[0:1", "[0:1]", ""],
)
def test_bad_specs_name_the_spec(numbered_dataset, spec):
    out, manifest = numbered_dataset
    with pytest.raises(ValueError, match=re.escape(repr(spec))):
        resolve_split(out, manifest, ["day_0", spec])


def test_default_splits_need_two_sources():
    with pytest.raises(ValueError, match="at least 2 sources"):
        default_split_specs({"sources": [{"name": "day_0"}]})

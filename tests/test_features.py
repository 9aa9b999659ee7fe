"""Everything downstream of preprocessing reads the dataset's features from its manifest.

A dataset that is not Criteo's (a ``click`` label, 2 dense features, 3 categorical ones of
which one holds bags of ids) is written by hand, then trained, evaluated and planned with
the real commands: the tables, the KJT keys, the dense width and the config checks all
follow the manifest.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import REPO, dlrm
from sklearn.metrics import roc_auc_score

from dlrm.data.loader import ParquetBatches
from dlrm.schema.features import Features
from dlrm.schema.manifest import FORMAT, MANIFEST, load_manifest
from dlrm.schema.splits import default_split_specs, resolve_split

CARDS = {"user": 60, "item": 40, "genres": 12}
FEATURES = Features("click", ("age", "price"), tuple(CARDS))
ROWS = 3000


def _planted(user: np.ndarray, item: np.ndarray, age: np.ndarray) -> np.ndarray:
    """P(click): a third of the users and half the items click far more; older users a
    bit."""
    return 0.05 + 0.5 * (user % 3 == 0) + 0.3 * (item % 2 == 0) + 0.1 * age


def _source(rng: np.random.Generator, out, name: str) -> dict:
    user = rng.integers(2, CARDS["user"], ROWS)
    item = rng.integers(2, CARDS["item"], ROWS)
    lengths = rng.integers(0, 4, ROWS)
    genres = [rng.integers(2, CARDS["genres"], n).tolist() for n in lengths]
    age = rng.random(ROWS).astype(np.float32)
    p = _planted(user, item, age)
    click = (rng.random(ROWS) < p).astype(np.int8)
    table = pa.table({"click": click, "age": age,
                      "price": rng.random(ROWS).astype(np.float32),
                      "user": user.astype(np.int64), "item": item.astype(np.int64),
                      "genres": pa.array(genres, pa.list_(pa.int64()))})
    path = f"data/{name}/part-00000-000.parquet"
    (out / path).parent.mkdir(parents=True)
    pq.write_table(table, out / path, row_group_size=1000)
    return {"name": name, "rows_accepted": ROWS, "rows_rejected": 0,
            "files": [{"path": path, "rows": ROWS}]}


@pytest.fixture(scope="module")
def other_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("other")
    rng = np.random.default_rng(0)
    sources = [_source(rng, out, f"day_{d}") for d in range(3)]
    manifest = {"format": FORMAT,
                "schema": {"label": "click", "dense": list(FEATURES.dense),
                           "sparse": list(FEATURES.sparse)},
                "encoding": {"type": "vocab", "min_frequency": 1, "max_vocab": 0},
                "cardinalities": list(CARDS.values()), "sources": sources,
                "rows_accepted": 3 * ROWS, "rows_rejected": 0, "rejected_by_reason": {}}
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


SMALL = ["--config", "configs/tiny.toml", "--data.batch_size=64", "--model.embedding_dim=8",
         "--model.dense_arch_layer_sizes=[16,8]", "--model.over_arch_layer_sizes=[16,1]",
         "--train.epochs=2", "--train.log_every=20"]


def test_batches_carry_the_manifests_features(other_dataset):
    manifest = load_manifest(other_dataset)
    features = manifest.features
    assert features == FEATURES
    segments = resolve_split(other_dataset, manifest, ["day_0"])
    batch = next(iter(ParquetBatches(segments, 32, 0, 1, features=features, prefetch=0)))
    assert batch.dense_features.shape == (32, 2)
    assert batch.sparse_features.keys() == ["user", "item", "genres"]
    first = pq.read_table(segments[0].path).slice(0, 32)
    assert batch.labels.tolist() == first.column("click").to_pylist()
    genres = batch.sparse_features["genres"]
    assert genres.lengths().tolist() == [len(g) for g in first.column("genres").to_pylist()]


def test_train_evaluate_and_plan_follow_the_manifest(other_dataset, tmp_path):
    """The planted signal is learnt through the tables: the test AUC lies within 0.02 of
    the planted model's (the Bayes AUC of the same rows; measured gaps -0.001 to 0.010
    over 5 training seeds) and above what the user's or the item's effect alone ranks."""
    manifest = load_manifest(other_dataset)
    test = pa.concat_tables([pq.read_table(s.path).slice(s.start, s.stop - s.start)
                             for s in resolve_split(other_dataset, manifest,
                                                    default_split_specs(manifest)["test"])])
    user, item, age, labels = (test.column(c).to_numpy() for c in ("user", "item", "age",
                                                                    "click"))
    assert labels.size == ROWS // 2
    bayes = roc_auc_score(labels, _planted(user, item, age))  # 0.818
    alone = max(roc_auc_score(labels, user % 3 == 0), roc_auc_score(labels, item % 2 == 0))

    run = tmp_path / "run"
    out = dlrm("train", *SMALL, f"--data.path={other_dataset}", "--run-dir", str(run)).stdout
    plan = (run / "plan.txt").read_text()
    assert all(f"t_{f}" in plan for f in CARDS) and "t_C1" not in plan
    (done,) = [json.loads(x) for x in out.splitlines() if '"event": "done"' in x]
    auc = done["test_auc"]
    assert bayes - 0.02 < auc <= bayes + 0.01, (auc, bayes)
    assert auc > alone + 0.05, (auc, alone)  # 0.716: the user's effect alone

    checkpoint = sorted((run / "checkpoints").glob("step-*"))[-1]
    report = tmp_path / "eval.json"
    dlrm("evaluate", "--checkpoint", str(checkpoint), "--data", str(other_dataset),
         "--out", str(report))
    assert json.loads(report.read_text())["metrics"]["auc"] == pytest.approx(
        done["test_auc"], abs=1e-6)

    planned = dlrm("plan", *SMALL, f"--data.path={other_dataset}", "--world-size", "4",
                   "--device", "cuda", "--hbm-gib", "16").stdout
    assert "t_genres" in planned


@pytest.mark.parametrize("override, key", [
    ('--sharding.table_sharding_types={C1=["table_wise"]}', "sharding.table_sharding_types.C1"),
    ("--model.num_embeddings_per_feature=[1000, 1000]", "model.num_embeddings_per_feature"),
    ("--data.multi_hot_sizes=[1, 2, 3, 4]", "data.multi_hot_sizes"),
])
def test_config_keys_are_checked_against_the_datasets_features(other_dataset, override, key):
    proc = subprocess.run([sys.executable, "-m", "dlrm", "train", *SMALL,
                           f"--data.path={other_dataset}", override],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"{key}:" in proc.stderr and "user, item, genres" in proc.stderr

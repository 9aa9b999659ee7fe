"""A warm start onto grown vocabularies (``dlrm preprocess --like BASE --grow``, then
``dlrm train --init-from CK``): each table grows, its old rows and their optimizer state
kept, its new rows a fresh table's; the new ids' rows train, and on a drifting log
(``dlrm synth --drift``) the rows of ids new since BASE score better than the
out-of-vocabulary id they had."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import checkpoint_tensors, dlrm, quiet

from dlrm.metrics import auc
from dlrm.preprocess.driver import preprocess
from dlrm.schema.features import SPARSE_NAMES
from dlrm.synth.criteo import synth

TINY = ["--config", "configs/tiny.toml", "--data.batch_size=64", "--train.log_every=50",
        "--model.embedding_dim=8", "--model.dense_arch_layer_sizes=[16,8]",
        "--model.over_arch_layer_sizes=[16,1]", "--eval.batch_size=500",
        "--optim.warmup_steps=0", "--optim.decay_steps=0", "--data.val_sources=none"]
TABLE = "/model/model.sparse_arch.embedding_bag_collection.embedding_bags.t_{}.weight"
STATE = ("/optim/state/embedding.model.sparse_arch.embedding_bag_collection.embedding_bags."
         "t_{0}.weight/t_{0}.momentum1")


@pytest.fixture(scope="module")
def drifting(tmp_path_factory) -> Path:
    """Three drifting days of 6000 rows: day 0 is BASE; days 1-2 grown from it (day 1
    trains, day 2 tests), and the same days encoded like BASE (new ids out of vocabulary)."""
    root = tmp_path_factory.mktemp("grown")
    synth(root / "raw", days=3, rows_per_day=6000, seed=7, drift=0.3)
    raw = [root / "raw" / f"day_{d}" for d in range(3)]
    preprocess(raw[:1], root / "base", workers=1, log=quiet, vocab_from=["day_0"])
    preprocess(raw[1:], root / "grown", workers=1, log=quiet, like=root / "base", grow=True)
    preprocess(raw[1:], root / "like", workers=1, log=quiet, like=root / "base")
    return root


def _train(run: Path, data: Path, train: str, test: str, *extra: str) -> dict:
    out = dlrm("train", *TINY, f"--data.path={data}", f"--data.train_sources=[\"{train}\"]",
               f"--data.test_sources={test}", "--run-dir", str(run), *extra).stdout
    return {e["event"]: e for e in map(json.loads, (x for x in out.splitlines()
                                                    if x.startswith('{"event"')))}


def _last(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step-*[0-9]"))[-1]


def _ids(dataset: Path, source: str, feature: str) -> np.ndarray:
    manifest = json.loads((dataset / "manifest.json").read_text())
    (files,) = [s["files"] for s in manifest["sources"] if s["name"] == source]
    return np.concatenate([pq.read_table(dataset / f["path"], columns=[feature]).column(0)
                           .to_numpy() for f in files])


def test_a_warm_start_onto_grown_vocabularies_keeps_old_rows_and_trains_new_ones(
        drifting, tmp_path):
    base, grown = drifting / "base", drifting / "grown"
    _train(tmp_path / "base", base, "day_0", "none", "--train.epochs=2")
    start = _last(tmp_path / "base")
    events = _train(tmp_path / "warm", grown, "day_1", '["day_2"]', "--init-from", str(start))
    growth = json.loads((grown / "manifest.json").read_text())["grown_from"]["growth"]
    assert events["init_from"]["rows_grown"] == sum(growth.values()) > 1000

    a = checkpoint_tensors(start, tmp_path)
    b = checkpoint_tensors(_last(tmp_path / "warm"), tmp_path)
    for c in ("C1", "C5", "C13"):  # features with new ids
        old, new = a[TABLE.format(c)], b[TABLE.format(c)]
        assert new.shape[0] == old.shape[0] + growth[c] and growth[c] > 0
        seen = np.zeros(new.shape[0], bool)
        # The rows the warm run's batches touched (in order, whole batches of 64).
        seen[_ids(grown, "day_1", c)[:events["done"]["samples"]]] = True
        untouched = torch.from_numpy(~seen)
        n = old.shape[0]
        # Old rows no batch touched are the base run's, to the bit, state included.
        assert untouched[:n].sum() > 0
        torch.testing.assert_close(new[:n][untouched[:n]], old[untouched[:n]], rtol=0, atol=0)
        torch.testing.assert_close(b[STATE.format(c)][:n][untouched[:n]],
                                   a[STATE.format(c)][untouched[:n]], rtol=0, atol=0)
        # New rows: a fresh table's initialisation (uniform within ±sqrt(1 / rows)) and
        # no optimizer state where untouched; trained (state above zero) where touched.
        fresh, bound = new[n:][untouched[n:]], (1.0 / new.shape[0]) ** 0.5
        if fresh.numel():
            assert fresh.abs().max() <= bound and fresh.abs().max() > bound / 2
            assert (b[STATE.format(c)][n:][untouched[n:]] == 0).all()
        # (A row whose only example the model already fits to float precision has a
        # gradient of exactly 0: nearly all, not all.)
        trained = (b[STATE.format(c)][n:][~untouched[n:]] != 0).any(dim=-1)
        assert trained.numel() > 10 and trained.float().mean() > 0.99

    # The same warm start, but the new days encoded like BASE: its new ids all one OOV row.
    _train(tmp_path / "oov", drifting / "like", "day_1", '["day_2"]', "--init-from",
           str(start))
    scores = {}
    for name, data in (("warm", grown), ("oov", drifting / "like")):
        out = tmp_path / f"{name}.parquet"
        dlrm("score", "--checkpoint", str(_last(tmp_path / name)), "--data", str(data),
             "--split", "test", "--out", str(out))
        scores[name] = pq.read_table(out)
    labels = scores["warm"].column("label").to_numpy()
    # The rows holding some id that BASE never had but day 1 trained (above OOV in both).
    sizes = json.loads((base / "manifest.json").read_text())["cardinalities"]
    has_new = np.zeros(labels.size, bool)
    for c, size in zip(SPARSE_NAMES, sizes, strict=True):
        has_new |= _ids(grown, "day_2", c) >= size
    assert 500 < has_new.sum() < labels.size
    got = {k: auc(labels[has_new], t.column("prob").to_numpy()[has_new])
           for k, t in scores.items()}
    assert got["warm"] > got["oov"] + 0.01, got

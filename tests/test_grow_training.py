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
from helpers import Server, checkpoint_tensors, dlrm, quiet, torchrun, train_killing_a_rank

from dlrm.metrics import auc
from dlrm.preprocess.driver import preprocess
from dlrm.rows.like import file_sha256
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


@pytest.fixture(scope="module")
def warm(drifting) -> tuple[Path, dict]:
    """BASE trained (2 epochs of day 0), then one pass of day 1 from its checkpoint on
    the grown dataset: the runs' directory and the warm run's events."""
    runs = drifting / "runs"
    _train(runs / "base", drifting / "base", "day_0", "none", "--train.epochs=2")
    events = _train(runs / "warm", drifting / "grown", "day_1", '["day_2"]', "--init-from",
                    str(_last(runs / "base")))
    return runs, events


def test_a_warm_start_onto_grown_vocabularies_keeps_old_rows_and_trains_new_ones(
        drifting, warm, tmp_path):
    base, grown = drifting / "base", drifting / "grown"
    runs, events = warm
    start = _last(runs / "base")
    growth = json.loads((grown / "manifest.json").read_text())["grown_from"]["growth"]
    assert events["init_from"]["rows_grown"] == sum(growth.values()) > 1000

    a = checkpoint_tensors(start, tmp_path)
    b = checkpoint_tensors(_last(runs / "warm"), tmp_path)
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
    for name, data, run in (("warm", grown, runs / "warm"),
                            ("oov", drifting / "like", tmp_path / "oov")):
        out = tmp_path / f"{name}.parquet"
        dlrm("score", "--checkpoint", str(_last(run)), "--data", str(data),
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


def test_a_grown_warm_start_on_two_ranks_resumes_exactly_after_a_rank_is_killed(
        drifting, tmp_path):
    _train(tmp_path / "base", drifting / "base", "day_0", "none",
           "--train.limit_train_batches=20")
    common = [*TINY, f"--data.path={drifting / 'grown'}", '--data.train_sources=["day_1"]',
              '--data.test_sources=["day_2"]', "--init-from", str(_last(tmp_path / "base")),
              "--train.checkpoint_every=10", "--train.keep_checkpoints=0", "--data.prefetch=0"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    first = torchrun(["-m", "dlrm", "train", *common, "--run-dir", str(whole)]).stdout
    assert '"event": "init_from"' in first
    out = train_killing_a_rank(common, killed, "step-000000010")
    starts = [json.loads(x) for x in out.splitlines() if '"event": "start"' in x]
    assert len(starts) == 2 and starts[1]["resumed_from"] and starts[1]["step"] >= 10
    assert out.count('"event": "init_from"') == 1  # the restart resumed its own checkpoint
    a, b = _last(whole), _last(killed)
    assert a.name == b.name
    ta, tb = checkpoint_tensors(a, tmp_path), checkpoint_tensors(b, tmp_path)
    assert ta.keys() == tb.keys() and TABLE.format("C1") in ta
    for key in ta:
        torch.testing.assert_close(tb[key], ta[key], rtol=1e-5, atol=1e-6, msg=key)
    ends = [json.loads((run / "eval" / "test.json").read_text())["metrics"]
            for run in (whole, killed)]
    assert ends[1]["auc"] == pytest.approx(ends[0]["auc"], abs=1e-6)


def test_the_server_reloads_the_grown_model_and_names_its_generation(drifting, warm,
                                                                     tmp_path):
    runs, _ = warm
    for name in ("base", "warm"):
        dlrm("export", "--checkpoint", str(_last(runs / name)), "--out", str(tmp_path / name))
    # Raw rows of day 2 holding values that day 0 never had.
    lines = (drifting / "raw" / "day_2").read_text().splitlines()[:200]
    rows = [line.split("\t") for line in lines]
    (tmp_path / "rows.tsv").write_text("\n".join(lines) + "\n")
    dlrm("predict", "--model", str(tmp_path / "warm"), "--input", str(tmp_path / "rows.tsv"),
         "--out", str(tmp_path / "warm.parquet"))
    want = pq.read_table(tmp_path / "warm.parquet").column("prob").to_numpy()
    server = Server(tmp_path / "base")
    try:
        before = server.get("/metadata")[1]["vocabulary"]
        old = server.post("/predict", {"rows": rows})[1]["predictions"]
        status, got = server.post("/admin/reload", {"model": str(tmp_path / "warm")})
        after = server.get("/metadata")[1]["vocabulary"]
        new = server.post("/predict", {"rows": rows})[1]["predictions"]
    finally:
        server.stop()
    assert status == 200 and got["previous"] != got["version"], got
    assert before["generation"] == 0 and before["lineage"] == []
    assert after["generation"] == 1 and after["lineage"] == [before["sha256"]]
    assert after["sha256"] == file_sha256(drifting / "grown" / "vocab.npz")
    np.testing.assert_allclose(new, want, rtol=0, atol=1e-6)
    assert not np.allclose(new, old, atol=1e-3)

"""Warm start (``dlrm train --init-from CK``): a new run from another run's checkpoint.

Training days 0-1, then day 2 from that run's checkpoint, equals one run over days 0-2
in order, to 1e-6 on every tensor and the final test metrics: one process, a constant
learning rate, no shuffle, and days 0-1 a whole number of batches (so that both see the
same batches); a warm run interrupted goes on from its own checkpoint, exactly. A
checkpoint of other ids, other tables or that does not exist is refused before
training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import checkpoint_tensors, dlrm, quiet

from dlrm.preprocess.driver import preprocess
from dlrm.synth.criteo import synth

TINY = ["--config", "configs/tiny.toml", "--data.batch_size=64", "--train.log_every=50",
        "--model.embedding_dim=8", "--model.dense_arch_layer_sizes=[16,8]",
        "--model.over_arch_layer_sizes=[16,1]", "--eval.batch_size=100",
        "--optim.warmup_steps=0", "--optim.decay_steps=0", "--data.val_sources=none",
        '--data.test_sources=["day_3"]']


@pytest.fixture(scope="module")
def four_days(tmp_path_factory) -> Path:
    """Four synthetic days of 4000 rows (62.5 batches of 64: days 0-1 are 125 whole)."""
    root = tmp_path_factory.mktemp("warm")
    synth(root / "raw", days=4, rows_per_day=4000, seed=3)
    preprocess([root / "raw" / f"day_{d}" for d in range(4)], root / "data", workers=1,
               log=quiet)
    return root


def _train(run: Path, data: Path, days: list[int], *extra: str) -> dict:
    """The run's final test metrics, and its events by name."""
    sources = json.dumps([f"day_{d}" for d in days])
    out = dlrm("train", *TINY, f"--data.path={data}", f"--data.train_sources={sources}",
               "--run-dir", str(run), *extra).stdout
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    events = {e["event"]: e for e in map(json.loads, (x for x in out.splitlines()
                                                      if x.startswith('{"event"')))}
    return {**[r for r in records if "eval/test/auc" in r][-1], "events": events}


def _last(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step-*[0-9]"))[-1]


def test_days_then_the_next_from_its_checkpoint_equal_one_run(four_days, tmp_path):
    data = four_days / "data"
    whole = _train(tmp_path / "whole", data, [0, 1, 2])
    _train(tmp_path / "first", data, [0, 1])
    warm = _train(tmp_path / "warm", data, [2], "--init-from", str(_last(tmp_path / "first")),
                  "--train.checkpoint_every=31")
    for key in ("eval/test/auc", "eval/test/logloss"):
        assert warm[key] == pytest.approx(whole[key], abs=1e-6), key
    assert _last(tmp_path / "warm").name == "step-000000062"  # its own steps: day 2's
    a = checkpoint_tensors(_last(tmp_path / "whole"), tmp_path)
    b = checkpoint_tensors(_last(tmp_path / "warm"), tmp_path)
    weights = [k for k in a if k.startswith("/model/")]
    moments = [k for k in a if k.startswith("/optim/") and "step" not in k]
    assert weights and moments and set(a) == set(b)
    for k in weights + moments:  # tables, MLPs and the optimizers' accumulators
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)

    # Interrupted after step 31 (its last checkpoint lost), the warm run run again goes on
    # from its own checkpoint, not from the other run's, and ends the same.
    shutil.rmtree(_last(tmp_path / "warm"))
    again = _train(tmp_path / "warm", data, [2], "--init-from", str(_last(tmp_path / "first")),
                   "--train.checkpoint_every=31")
    assert again["events"]["restore"]["step"] == 31 and "init_from" not in again["events"]
    (tmp_path / "again").mkdir()
    c = checkpoint_tensors(_last(tmp_path / "warm"), tmp_path / "again")
    for k in weights + moments:
        torch.testing.assert_close(c[k], b[k], rtol=0, atol=0, msg=k)

    # Weights only: the same start, a fresh optimizer; so another end.
    fresh = _train(tmp_path / "fresh", data, [2], "--init-from",
                   str(_last(tmp_path / "first")), "--init-from-weights-only")
    assert fresh["eval/test/logloss"] != pytest.approx(whole["eval/test/logloss"], abs=1e-6)
    assert fresh["events"]["init_from"]["weights_only"] is True
    assert warm["events"]["init_from"]["its_step"] == 125
    assert "init_from" not in whole["events"]


def test_a_checkpoint_of_other_ids_or_tables_is_refused(four_days, tmp_path):
    data = four_days / "data"
    _train(tmp_path / "first", data, [0, 1], "--train.limit_train_batches=3")
    checkpoint = str(_last(tmp_path / "first"))
    other = tmp_path / "other"  # the same days, counted again: vocabularies of its own
    preprocess([four_days / "raw" / f"day_{d}" for d in range(4)], other, workers=1,
               log=quiet)
    cases = [
        ([f"--data.path={other}", "--init-from", checkpoint], "vocabularies of its own"),
        ([f"--data.path={data}", "--init-from", checkpoint,
          "--model.num_embeddings_per_feature=" + json.dumps([5000] * 26)], "tables hold"),
        ([f"--data.path={data}", "--init-from", str(tmp_path / "nowhere")], "nowhere"),
        ([f"--data.path={data}", "--init-from-weights-only"], "init_from"),
    ]
    for args, says in cases:
        proc = dlrm("train", *TINY, *args, "--run-dir", str(tmp_path / "refused"),
                    check=False)
        assert proc.returncode == 2 and says in proc.stderr, (args, proc.stderr[-800:])
        assert not (tmp_path / "refused" / "checkpoints").exists()  # refused before training

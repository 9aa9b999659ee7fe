"""Checkpoint, resume, preemption and failure recovery of real `dlrm train` runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, checkpoint_tensors, dlrm, torchrun, train_killing_a_rank

from dlrm.train.column_splits import _blend

SMALL = ["--config", "configs/tiny.toml", "--data.batch_size=32", "--train.log_every=10",
         "--model.embedding_dim=8", "--model.dense_arch_layer_sizes=[16,8]",
         "--model.over_arch_layer_sizes=[16,1]", "--data.prefetch=0"]


def position(path: Path) -> dict:
    return json.loads((path / "COMPLETE.json").read_text())["position"]


def newest(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step-*[0-9]"))[-1]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_metrics(run: Path) -> dict[str, float]:
    return {k: v for r in metrics(run) for k, v in r.items() if k.startswith("eval/")}


# Every embedding optimizer with a CPU kernel and every dense optimizer, each at least once;
# the state each keeps (none for SGD) must come back whole.
OPTIMIZERS = [("rowwise_adagrad", "adam", ("momentum1", "exp_avg", "exp_avg_sq")),
              ("adagrad", "adagrad", ("momentum1", "sum")),
              ("sgd", "sgd", ())]


@pytest.mark.parametrize("embedding, dense, states", OPTIMIZERS,
                         ids=[f"{e}+{d}" for e, d, _ in OPTIMIZERS])
def test_sigkill_of_a_rank_restarts_and_ends_with_the_same_model(small_dataset, tmp_path,
                                                                 embedding, dense, states):
    common = [*SMALL, f"--data.path={small_dataset}", "--train.epochs=2",
              "--train.checkpoint_every=10", "--train.keep_checkpoints=0",
              f"--optim.embedding_optimizer={embedding}", f"--optim.dense_optimizer={dense}",
              "--optim.dense_lr=0.01"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    torchrun(["-m", "dlrm", "train", *common, "--run-dir", str(whole)])

    out = train_killing_a_rank(common, killed, "step-000000010")
    starts = [json.loads(line) for line in out.splitlines() if '"event": "start"' in line]
    assert len(starts) == 2 and starts[1]["resumed_from"] and starts[1]["step"] >= 10
    end_whole, end_killed = newest(whole), newest(killed)
    assert end_whole.name == end_killed.name  # the same number of steps
    assert position(end_whole) == position(end_killed)  # data position and RNG states
    assert len(position(end_killed)["rng"]) == 2
    a, b = checkpoint_tensors(end_whole, tmp_path), checkpoint_tensors(end_killed, tmp_path)
    assert a.keys() == b.keys()
    assert {s for s in states if any(k.endswith(s) for k in a)} == set(states)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    whole_metrics, killed_metrics = final_metrics(whole), final_metrics(killed)
    assert whole_metrics.keys() == killed_metrics.keys() and "eval/test/auc" in whole_metrics
    for key, value in whole_metrics.items():
        assert killed_metrics[key] == pytest.approx(value, abs=1e-6), key
    # The restarted run's log goes on where the first stopped: steps never go back (nor
    # repeat), and from the resumed step on it logs the steps the undisturbed run logged.
    steps = [r["step"] for r in metrics(killed) if "train/loss" in r]
    assert all(a < b for a, b in zip(steps, steps[1:], strict=False)), steps
    assert steps[-1] == int(end_killed.name[5:])
    resumed = starts[1]["step"]
    assert [s for s in steps if s > resumed] == [
        r["step"] for r in metrics(whole) if "train/loss" in r and r["step"] > resumed], steps


def test_sigterm_checkpoints_and_exits_cleanly_then_auto_resume_finishes(small_dataset,
                                                                        tmp_path):
    run = tmp_path / "run"
    args = [*SMALL, f"--data.path={small_dataset}", "--train.epochs=3", "--run-dir", str(run)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "dlrm", "train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() or not metrics(run):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    (preempted,) = [json.loads(x) for x in out.splitlines() if '"event": "preempted"' in x]
    saved = newest(run)
    assert position(saved)["step"] == preempted["step"] and preempted["step"] < 3 * 250

    out = dlrm("train", *args).stdout  # resume auto, the default
    (start,) = [json.loads(x) for x in out.splitlines() if '"event": "start"' in x]
    assert start["resumed_from"] == str(saved) and start["step"] == preempted["step"]
    end = position(newest(run))
    assert len(end.pop("rng")) == 1 and len(end.pop("table_sizes")) == 26
    assert end == {"step": 3 * 250, "epoch": 3, "batch": 0, "world_size": 1, "batch_size": 32,
                   "label_kind": "binary", "stopped": None,
                   "best": {"metric": "auc", "value": None, "step": None, "stale": 0}}
    assert any("eval/test/auc" in r for r in metrics(run))


def test_resume_skips_a_bad_checkpoint_and_refuses_an_explicit_one(small_dataset, tmp_path):
    run = tmp_path / "run"
    args = [*SMALL, f"--data.path={small_dataset}", "--train.limit_train_batches=30",
            "--train.checkpoint_every=10", "--run-dir", str(run)]
    dlrm("train", *args)
    good, bad = run / "checkpoints" / "step-000000020", run / "checkpoints" / "step-000000030"
    data = next(p for p in bad.iterdir() if p.suffix == ".distcp")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])

    proc = subprocess.run([sys.executable, "-m", "dlrm", "train", *args, "--resume", str(bad),
                           "--run-dir", str(tmp_path / "other")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "dlrm train: error:" in proc.stderr and str(bad) in proc.stderr

    proc = subprocess.run([sys.executable, "-m", "dlrm", "train", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step-000000030" in proc.stderr and "truncated" in proc.stderr  # the warning
    (start,) = [json.loads(x) for x in proc.stdout.splitlines() if '"event": "start"' in x]
    assert start["resumed_from"] == str(good)


@pytest.mark.parametrize("written_by, read_by", [(2, 1), (1, 2)])
def test_checkpoint_restores_on_another_world_size(small_dataset, tmp_path, written_by, read_by):
    """A finished run's checkpoint, resumed by another number of ranks: nothing left to
    train, so the evaluation must give the same metrics."""
    def launch(nproc: int, *args: str) -> None:
        if nproc == 1:
            dlrm("train", *args)
        else:
            torchrun(["-m", "dlrm", "train", *args], nproc=nproc)

    common = [*SMALL, f"--data.path={small_dataset}"]
    first, second = tmp_path / "first", tmp_path / "second"
    launch(written_by, *common, "--run-dir", str(first))
    launch(read_by, *common, "--run-dir", str(second), "--resume", str(newest(first)))
    a = {k: v for r in metrics(first) for k, v in r.items() if k.startswith("eval/")}
    b = {k: v for r in metrics(second) for k, v in r.items() if k.startswith("eval/")}
    assert a.keys() == b.keys() and a["eval/test/rows"] == b["eval/test/rows"]
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=2e-6), key


def _launch(nproc: int, *args: str) -> None:
    if nproc == 1:
        dlrm("train", *args)
    else:
        torchrun(["-m", "dlrm", "train", *args], nproc=nproc)


@pytest.mark.parametrize("written_by, read_by", [(2, 1), (1, 2)])
def test_rowwise_adagrad_restores_across_a_changed_column_split(small_dataset, tmp_path,
                                                                written_by, read_by):
    """Row-wise Adagrad keeps one accumulator per column shard: C1 cut into two 4-wide
    column shards on 2 ranks saves 2 × rows values, one whole table expects rows. The
    restored state is the width-weighted mean of the saved blocks (2 → 1), or the saved
    block for each part (1 → 2); everything else comes back as it was."""
    split = ['--sharding.table_sharding_types={C1=["column_wise"]}',
             "--sharding.column_shard_dim=4"]
    whole = ['--sharding.table_sharding_types={C1=["table_wise"]}']
    common = [*SMALL, f"--data.path={small_dataset}", "--optim.embedding_optimizer=rowwise_adagrad"]
    first, second = tmp_path / "first", tmp_path / "second"
    _launch(written_by, *common, *(split if written_by == 2 else whole),
            "--train.limit_train_batches=20", "--run-dir", str(first))
    # Nothing left to train on the second world size: the saved state is evaluated as read.
    _launch(read_by, *common, *(split if read_by == 2 else whole),
            "--train.limit_train_batches=10", "--run-dir", str(second),
            "--resume", str(newest(first)))
    plan = (first if written_by == 2 else second) / "plan.txt"
    c1 = next(line for line in plan.read_text().splitlines() if line.startswith("t_C1 "))
    assert "column_wise" in c1 and c1.count(",") == 1  # two shards

    a, b = checkpoint_tensors(newest(first), tmp_path), checkpoint_tensors(newest(second), tmp_path)
    (key,) = [k for k in a if k.endswith("t_C1.momentum1")]
    rows = next(v for k, v in a.items() if k.endswith("t_C1.weight")).shape[0]
    if written_by == 2:
        assert a[key].shape == (2 * rows,) and b[key].shape == (rows,)
        expected = (a[key][:rows].double() + a[key][rows:].double()) / 2
    else:
        assert a[key].shape == (rows,) and b[key].shape == (2 * rows,)
        expected = torch.cat([a[key], a[key]]).double()
    assert not torch.equal(a[key], torch.zeros_like(a[key]))  # it trained
    torch.testing.assert_close(b[key].double(), expected, rtol=1e-6, atol=0)
    assert a.keys() == b.keys()
    for k in a.keys() - {key}:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    for name, value in final_metrics(first).items():
        assert final_metrics(second)[name] == pytest.approx(value, abs=2e-6), name


def test_column_split_blend_weights_each_saved_block_by_its_columns():
    saved = torch.tensor([1.0, 2.0, 10.0, 20.0])  # 2 rows; blocks of columns [0,3), [3,8)
    cols = [(0, 3), (3, 5)]
    assert _blend(saved, 2, cols, 0, 8).tolist() == [(3 * 1 + 5 * 10) / 8, (3 * 2 + 5 * 20) / 8]
    assert _blend(saved, 2, cols, 0, 2).tolist() == [1.0, 2.0]  # inside the first block
    assert _blend(saved, 2, cols, 2, 4).tolist() == [(1 + 3 * 10) / 4, (2 + 3 * 20) / 4]

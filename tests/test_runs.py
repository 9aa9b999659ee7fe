"""Comparing runs: TensorBoard event files read back with tensorboard's own reader,
`dlrm report` over several runs, and `dlrm sweep` (Optuna) that resumes without starting
a finished trial again, and retries one it was killed in."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from helpers import REPO, dlrm
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dlrm.errors import ConfigError
from dlrm.experiments.sweep import STUDY, sweep

SPACE = """
["optim.embedding_lr"]
low = 0.02
high = 0.2
log = true

["optim.dense_optimizer"]
choices = ["adagrad", "adam"]
"""


@pytest.fixture(scope="module")
def two_runs(small_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for name, lr in (("lr_a", "0.1"), ("lr_b", "0.02")):
        dlrm("train", "--config", "configs/tiny.toml", f"--data.path={small_dataset}",
             "--run-dir", str(root / name), "--train.log_every=4", "--train.eval_every=8",
             f"--optim.embedding_lr={lr}",
             "--train.tensorboard=true")
    return root


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_holds_every_logged_scalar(two_runs):
    run = two_runs / "lr_a"
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/embedding_lr", "train/samples_per_sec",
            "eval/val/auc", "eval/test/auc", "eval/val/logloss",
            "plan/rank0/ddr_gib"} <= tags
    logged = {}
    for record in _metrics(run):
        for key, value in record.items():
            if key != "step" and value is not None:
                logged.setdefault(key, []).append((record["step"], value))
    assert set(logged) <= tags
    for key, points in logged.items():
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in points], key
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-5,
                                                    abs=1e-6), key
    assert len(logged["eval/val/auc"]) >= 2  # within the epoch and at its end


def test_report_overlays_several_runs(two_runs):
    out = dlrm("report", str(two_runs / "lr_a"), str(two_runs / "lr_b")).stdout
    page = json.loads(out.splitlines()[-1])["page"]
    assert page == str(two_runs / "report" / "index.md")
    text = (two_runs / "report" / "index.md").read_text()
    assert "## Training loss (2 runs)" in text and "## Validation AUC (2 runs)" in text
    assert (two_runs / "report" / "loss.png").stat().st_size > 10_000
    metrics, differences = text.split("## Config differences")
    table = [line for line in metrics.splitlines() if line.startswith("| lr_")]
    finals = [_metrics(two_runs / n) for n in ("lr_a", "lr_b")]
    for line, records in zip(table, finals, strict=True):
        last = [r["eval/test/auc"] for r in records if "eval/test/auc" in r][-1]
        assert f"{last:.6g}" in line
    assert "optim.embedding_lr" in differences and "data.path" not in differences
    assert "| lr_b | 0.02 |" in differences


def _study(root):
    return optuna.load_study(study_name=STUDY,
                             storage=JournalStorage(JournalFileBackend(str(root / "study.log"))))


def _sweep_args(small_dataset, root, trials):
    return ["sweep", "--config", "configs/tiny.toml", "--space", str(root / "space.toml"),
            "--trials", str(trials), "--runs-dir", str(root / "sweep"),
            f"--data.path={small_dataset}", "--train.log_every=8"]


def test_sweep_reruns_start_no_finished_trial(small_dataset, tmp_path):
    (tmp_path / "space.toml").write_text(SPACE)
    dlrm(*_sweep_args(small_dataset, tmp_path, 2))
    root = tmp_path / "sweep"
    trials = _study(root).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    best = json.loads((root / "best.json").read_text())
    assert best["auc"] == max(t.value for t in trials)
    assert set(best["params"]) == {"optim.embedding_lr", "optim.dense_optimizer"}
    config = (root / f"trial-{best['trial']:04d}" / "config.toml").read_text()
    assert f'dense_optimizer = "{best["params"]["optim.dense_optimizer"]}"' in config
    report = (root / "report" / "index.md").read_text()
    assert "trial-0000" in report and "trial-0001" in report
    stamps = {p: p.stat().st_mtime_ns for p in root.glob("trial-*/metrics.jsonl")}

    out = dlrm(*_sweep_args(small_dataset, tmp_path, 2)).stdout
    assert '"finished": 2, "to_run": 0' in out
    assert {p: p.stat().st_mtime_ns for p in root.glob("trial-*/metrics.jsonl")} == stamps
    assert len(_study(root).get_trials()) == 2

    out = dlrm(*_sweep_args(small_dataset, tmp_path, 3)).stdout
    assert '"finished": 2, "to_run": 1' in out
    trials = _study(root).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert trials[2].params not in (trials[0].params, trials[1].params)  # not replayed
    assert {p: p.stat().st_mtime_ns for p in root.glob("trial-000[01]/metrics.jsonl")} == stamps


def test_a_sweep_killed_mid_trial_retries_that_trial_with_its_values(small_dataset, tmp_path):
    (tmp_path / "space.toml").write_text(SPACE)
    cmd = [sys.executable, "-m", "dlrm", *_sweep_args(small_dataset, tmp_path, 2)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    started = tmp_path / "sweep" / "trial-0000" / "metrics.jsonl"
    deadline = time.time() + 300
    while not started.exists() and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    cut = _study(tmp_path / "sweep").get_trials()
    assert [t.state for t in cut] == [TrialState.RUNNING]

    out = dlrm(*_sweep_args(small_dataset, tmp_path, 2)).stdout
    assert '"event": "sweep_retry", "trial": 0' in out
    trials = _study(tmp_path / "sweep").get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE,
                                         TrialState.COMPLETE]
    assert trials[1].params == cut[0].params  # the cut-off trial, again


@pytest.mark.parametrize("text, key", [
    ('["optim.no_such_key"]\nchoices = [1, 2]\n', "no_such_key"),
    ('["optim.embedding_lr"]\nlow = 0.5\nhigh = 0.1\n', "low < high"),
    ('["optim.embedding_lr"]\nlow = 0.0\nhigh = 0.1\nlog = true\n', "log range"),
    ('["optim.embedding_lr"]\nchoices = []\n', "choices"),
])
def test_sweep_space_errors_name_the_key(small_dataset, tmp_path, text, key):
    (tmp_path / "space.toml").write_text(text)
    with pytest.raises(ConfigError, match=key):
        sweep("configs/tiny.toml", str(tmp_path / "space.toml"), 1, tmp_path / "sweep",
              [f"--data.path={small_dataset}"])
    assert not (tmp_path / "sweep" / "trial-0000").exists()


def test_sweep_names_a_missing_dataset(tmp_path):
    (tmp_path / "space.toml").write_text(SPACE)
    with pytest.raises(ConfigError, match="data.path: .*no_such_dir"):
        sweep("configs/tiny.toml", str(tmp_path / "space.toml"), 1, tmp_path / "sweep",
              [f"--data.path={tmp_path / 'no_such_dir'}"])

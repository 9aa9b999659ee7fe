"""`dlrm evaluate`, `dlrm score` and `dlrm report` on a real checkpoint, alone and under
torchrun, against the training run's own evaluation and scikit-learn."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import REPO, dlrm, torchrun
from sklearn.metrics import log_loss, roc_auc_score


def test_evaluate_one_and_two_ranks_agree_with_training(trained, small_dataset, tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    out = dlrm("evaluate", "--checkpoint", str(trained), "--data", str(small_dataset),
               "--out", str(one)).stdout
    assert "auc" in out and "calibration" in out  # the printed table
    torchrun(["-m", "dlrm", "evaluate", "--checkpoint", str(trained), "--data",
              str(small_dataset), "--out", str(two)])
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert a["metrics"] == b["metrics"]  # identical, not merely close
    during = json.loads((trained.parent.parent / "eval" / "test.json").read_text())
    for key, value in during["metrics"].items():
        assert a["metrics"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert a["metrics"]["rows"] == 2000 and 0.5 < a["metrics"]["auc"] < 1


def test_score_writes_every_row_and_matches_sklearn(trained, small_dataset, tmp_path):
    scores = tmp_path / "scores.parquet"
    torchrun(["-m", "dlrm", "score", "--checkpoint", str(trained), "--data",
              str(small_dataset), "--out", str(scores)])
    table = pq.read_table(scores)
    assert table.column_names == ["row", "label", "prob"]
    rows, labels, probs = (table[c].to_numpy() for c in table.column_names)
    assert list(rows) == list(range(2000))
    report = json.loads((trained.parent.parent / "eval" / "test.json").read_text())
    m = report["metrics"]
    assert labels.mean() == pytest.approx(m["ctr"], abs=1e-12)
    assert roc_auc_score(labels, probs) == pytest.approx(m["auc"], abs=1e-6)
    assert log_loss(labels, probs) == pytest.approx(m["logloss"], abs=1e-6)


def test_report_draws_the_run(trained):
    run = trained.parent.parent
    out = dlrm("report", str(run)).stdout
    page = Path(json.loads(out.splitlines()[-1])["page"])
    text = page.read_text()
    for png in ("loss.png", "auc.png", "roc.png", "calibration.png"):
        assert (page.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({png})" in text
    assert "| auc |" in text


def _fails(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dlrm", *args], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    return proc


def test_bad_checkpoints_and_runs_are_clear_errors(trained, small_dataset, tmp_path):
    copy = tmp_path / "run" / "checkpoints" / trained.name
    shutil.copytree(trained, copy)
    err = _fails("evaluate", "--checkpoint", str(copy), "--data", str(small_dataset)).stderr
    assert "config.toml" in err  # no run directory around it
    (copy / "COMPLETE.json").unlink()
    err = _fails("evaluate", "--checkpoint", str(copy), "--data", str(small_dataset)).stderr
    assert str(copy) in err and "incomplete" in err
    assert "metrics.jsonl" in _fails("report", str(tmp_path)).stderr


def test_offline_builds_from_the_run_config_as_written(trained, small_dataset, tmp_path):
    """Scoring a checkpoint on another copy of its dataset reads that copy's rows while
    the run's config stays as the run wrote it (its data path, device and embedding
    optimizer unchanged): the inference settings are the model builder's, not a rewrite."""
    copy = tmp_path / "copy"
    shutil.copytree(small_dataset, copy)
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from dlrm.train.offline import Offline\n"
        "from dlrm.train.preflight import run_config\n"
        "ckpt, data = Path(sys.argv[1]), sys.argv[2]\n"
        "o = Offline(ckpt, data, 'test')\n"
        "root = Path(data).resolve()\n"
        "under = all(Path(s.path).resolve().is_relative_to(root) for s in o.segments)\n"
        "print(json.dumps({'same': o.config == run_config(ckpt),\n"
        "                  'data_path': o.config.data.path,\n"
        "                  'optimizer': o.config.optim.embedding_optimizer,\n"
        "                  'under': under,\n"
        "                  'rows': sum(s.stop - s.start for s in o.segments)}))\n")
    out = subprocess.run([sys.executable, "-c", code, str(trained), str(copy)], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["same"] is True
    assert got["data_path"] == str(small_dataset)
    assert got["optimizer"] == "adagrad"  # configs/tiny.toml's, though SGD scores
    assert got["under"] is True  # every row read from the copy
    assert got["rows"] == 2000  # the second half of the last day's 4000

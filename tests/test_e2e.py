"""synth → preprocess → 2-process torchrun training → evaluation, through the CLI."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from helpers import dlrm, torchrun


@pytest.mark.parametrize("encoding", [["--encoding", "vocab"],
                                      ["--encoding", "hash", "--buckets", "5000"]])
def test_main_job_end_to_end(tmp_path: Path, encoding: list[str]):
    raw, data, run = tmp_path / "raw", tmp_path / "data", tmp_path / "run"
    dlrm("synth", "--out", str(raw), "--days", "3", "--rows-per-day", "6001", "--seed", "3")
    dlrm("preprocess", "--input", *[str(raw / f"day_{d}") for d in range(3)],
         "--out", str(data), "--workers", "2", *encoding)
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["rows_accepted"] == 3 * 6001 and manifest["rows_rejected"] == 0
    assert manifest["encoding"]["type"] == encoding[1]
    if encoding[1] == "hash":
        assert manifest["cardinalities"] == [5000] * 26

    proc = torchrun(["-m", "dlrm", "train", "--config", "configs/tiny.toml",
                     f"--data.path={data}", "--run-dir", str(run), "--data.batch_size=256",
                     "--train.log_every=10"])

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    # 2 days × 6001 rows over 2 ranks of 256: 23 full steps per rank, logged every 10.
    assert [r["step"] for r in train] == [10, 20, 23]
    assert all(r["train/samples_per_sec"] > 0 for r in train)
    assert train[-1]["train/loss"] < train[0]["train/loss"]
    final = {k: v for r in records if r["step"] == 23 for k, v in r.items()}
    # The test split is the second half of day 2, every row once across both ranks
    # (3001 rows: uneven, so one rank's last batch is padded).
    assert final["eval/test/rows"] == 6001 - 6001 // 2
    assert final["eval/val/rows"] == 6001 // 2
    truth = json.loads((raw / "truth.json").read_text())["splits"]["test"]
    assert 0.6 < final["eval/test/auc"] < truth["bayes_auc"]
    assert 0.3 < final["eval/test/logloss"] < 0.65

    # Only rank 0 prints: one "done" event, carrying the same figures as the metrics.
    done = [json.loads(line) for line in proc.stdout.splitlines() if '"event": "done"' in line]
    assert len(done) == 1 and done[0]["test_auc"] == final["eval/test/auc"]
    config = tomllib.loads((run / "config.toml").read_text())
    assert config["data"]["batch_size"] == 256 and config["data"]["path"] == str(data)
    plan = (run / "plan.txt").read_text()
    assert "t_C1 " in plan and "rank:1" in plan  # tables really placed on both ranks

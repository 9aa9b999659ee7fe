"""Interactions, embedding optimizers, the LR schedule, planner options, target AUC and
`dlrm plan`: each trained or planned for real (gloo on CPU)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import REPO, checkpoint_tensors, dlrm, torchrun

from dlrm.config import OptimConfig
from dlrm.train.optim import lr_scale

SMALL = ["--config", "configs/tiny.toml", "--data.batch_size=64", "--train.log_every=1",
         "--model.embedding_dim=8", "--model.dense_arch_layer_sizes=[16,8]",
         "--model.over_arch_layer_sizes=[16,1]", "--eval.limit_batches=2"]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def events(out: str, name: str) -> list[dict]:
    return [json.loads(x) for x in out.splitlines() if f'"event": "{name}"' in x]


def optimizer_state(run: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the embedding optimizer state of table t_C1 in the run's last checkpoint."""
    path = sorted((run / "checkpoints").glob("step-*[0-9]"))[-1]
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k.rsplit(".", 1)[1]: tuple(v.size) for k, v in meta.items()
            if k.startswith("optim.state.embedding.") and ".t_C1.weight." in k}


def test_lr_schedule_matches_mlperf_definition_at_chosen_updates():
    cfg = OptimConfig(warmup_steps=4, decay_start=10, decay_steps=5, decay_power=2.0)
    got = {u: lr_scale(u, cfg) for u in (1, 2, 3, 4, 7, 10, 11, 12, 15, 16, 100)}
    assert got == {1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0, 7: 1.0, 10: 1.0,
                   11: 1.0, 12: (4 / 5) ** 2, 15: (1 / 5) ** 2, 16: (1 / 5) ** 2,
                   100: (1 / 5) ** 2}
    assert lr_scale(5, OptimConfig()) == 1.0  # no schedule: constant


def test_lr_schedule_drives_both_optimizers_in_training(small_dataset, tmp_path):
    """The rates logged at each step are the schedule's."""
    run = tmp_path / "run"
    dlrm("train", *SMALL, f"--data.path={small_dataset}", "--optim.dense_lr=0.2",
         "--optim.warmup_steps=3", "--optim.decay_start=5", "--optim.decay_steps=4",
         "--train.limit_train_batches=12", "--run-dir", str(run))
    cfg = OptimConfig(warmup_steps=3, decay_start=5, decay_steps=4)
    lrs = {r["step"]: r["train/lr"] for r in records(run) if "train/lr" in r}
    assert sorted(lrs) == list(range(1, 13))
    for step, lr in lrs.items():
        assert lr == pytest.approx(0.2 * lr_scale(step, cfg), abs=1e-6), step  # 6 digits logged


def test_fused_embedding_optimizer_follows_the_schedule(small_dataset, tmp_path):
    """One SGD update at rate 0.5 scaled by warmup 1/2 makes the same model, tables
    included, as one update at rate 0.25 without a schedule."""
    common = [*SMALL, f"--data.path={small_dataset}", "--optim.embedding_optimizer=sgd",
              "--optim.dense_optimizer=sgd", "--train.limit_train_batches=1"]
    dlrm("train", *common, "--optim.embedding_lr=0.5", "--optim.dense_lr=0.4",
         "--optim.warmup_steps=2", "--run-dir", str(tmp_path / "warm"))
    dlrm("train", *common, "--optim.embedding_lr=0.25", "--optim.dense_lr=0.2",
         "--run-dir", str(tmp_path / "flat"))
    dlrm("train", *common, "--optim.embedding_lr=0.5", "--optim.dense_lr=0.2",
         "--run-dir", str(tmp_path / "control"))
    ckpt = "checkpoints/step-000000001"
    warm, flat, control = (checkpoint_tensors(tmp_path / r / ckpt, tmp_path)
                           for r in ("warm", "flat", "control"))
    tables = [k for k in warm if "embedding_bags" in k and k.startswith("/model/")]
    assert len(tables) == 26
    for key in warm:
        torch.testing.assert_close(warm[key], flat[key], msg=key)
    assert any(not torch.equal(flat[k], control[k]) for k in tables)  # the rate matters


@pytest.mark.parametrize("optimizer,state", [
    ("rowwise_adagrad", {"momentum1": 1}),  # one accumulator per row
    ("adagrad", {"momentum1": 2}),  # exact: one per element
    ("sgd", {}),
])
def test_each_cpu_embedding_optimizer_trains(small_dataset, tmp_path, optimizer, state):
    run = tmp_path / "run"
    dlrm("train", *SMALL, f"--data.path={small_dataset}",
         f"--optim.embedding_optimizer={optimizer}", "--train.limit_train_batches=6",
         "--run-dir", str(run))
    losses = [r["train/loss"] for r in records(run) if "train/loss" in r]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert {k: len(v) for k, v in optimizer_state(run).items()} == state


@pytest.mark.parametrize("override,key", [
    ("--optim.embedding_optimizer=adam", "optim.embedding_optimizer"),  # no fbgemm CPU kernel
    ("--train.autocast=bf16", "train.autocast"),  # GPU only
])
def test_gpu_only_settings_are_refused_on_cpu_before_training(small_dataset, tmp_path,
                                                              override, key):
    proc = subprocess.run([sys.executable, "-m", "dlrm", "train", *SMALL,
                           f"--data.path={small_dataset}", override,
                           "--run-dir", str(tmp_path / "run")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"dlrm train: error: {key}:")
    assert not (tmp_path / "run").exists()


def test_dcn_trains_sharded_with_adam_dense_fp16_tables_and_quantized_comms(small_dataset,
                                                                           tmp_path):
    run = tmp_path / "run"
    out = torchrun(["-m", "dlrm", "train", *SMALL, f"--data.path={small_dataset}",
                    "--model.interaction=dcn", "--model.dcn_num_layers=2",
                    "--model.dcn_low_rank_dim=4", "--model.embedding_dtype=fp16",
                    "--optim.dense_optimizer=adam", "--optim.dense_lr=0.01",
                    "--sharding.a2a_forward_precision=fp16",
                    "--sharding.a2a_backward_precision=fp16",
                    "--sharding.allreduce_precision=fp16",
                    "--sharding.table_sharding_types={C1=[\"column_wise\"]}",
                    "--train.limit_train_batches=20", "--run-dir", str(run)]).stdout
    losses = [r["train/loss"] for r in records(run) if "train/loss" in r]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) < sum(losses[:5])  # it learns
    (plan,) = events(out, "plan")
    assert [m["rank"] for m in plan["memory_per_rank"]] == [0, 1]
    assert all(m["ddr_gib"] > 0 for m in plan["memory_per_rank"])
    # On CPU the total is the rank's resident memory: tables, dense part and the runtime.
    assert all(m["total_gib"] >= m["ddr_gib"] + m["dense_gib"] + 0.5 and m["dense_gib"] >= 0
               for m in plan["memory_per_rank"])
    (done,) = events(out, "done")
    assert len(done["peak_rss_gib"]) == 2 and min(done["peak_rss_gib"]) > 0.1  # measured
    text = (run / "plan.txt").read_text()
    c1 = [line for line in text.splitlines() if line.startswith("t_C1 ")]
    assert len(c1) == 2  # column_wise over 2 ranks: two shards of t_C1
    dcn = [k for k in dcp.FileSystemReader(str(sorted((run / "checkpoints").glob(
        "step-*[0-9]"))[-1])).read_metadata().state_dict_metadata if "crossnet" in k]
    assert dcn  # the DCN cross layers were trained and saved


def test_target_auc_stops_early(small_dataset, tmp_path):
    run = tmp_path / "run"
    out = dlrm("train", *SMALL, f"--data.path={small_dataset}", "--train.target_auc=0.5",
               "--train.eval_every=4", "--train.epochs=3", "--run-dir", str(run)).stdout
    (hit,) = events(out, "target_reached")
    assert hit["step"] == 4 and hit["auc"] >= 0.5
    (done,) = events(out, "done")
    assert done["target_reached"] and done["steps"] == 4


def test_a_target_not_reached_keeps_training_until_reached_or_the_end(small_dataset,
                                                                    tmp_path):
    """A target above every validation: training runs to its end. A target above the first
    validation's AUC and below a later one's: training goes on past the first and stops at
    the first validation that reaches it, the same run up to there (training is seeded)."""
    common = [*SMALL, f"--data.path={small_dataset}", "--train.eval_every=8",
              "--train.limit_train_batches=32", "--train.log_every=8"]
    out = dlrm("train", *common, "--train.target_auc=0.99", "--run-dir",
               str(tmp_path / "a")).stdout
    assert not events(out, "target_reached")
    (done,) = events(out, "done")
    assert not done["target_reached"] and done["steps"] == 32
    aucs = {e["step"]: e["auc"] for e in events(out, "eval") if e["split"] == "val"}
    assert sorted(aucs) == [8, 16, 24, 32], aucs
    # The first validation after the first whose AUC beats every one before it (not the last).
    later = [s for s in (16, 24) if aucs[s] > max(v for k, v in aucs.items() if k < s)]
    assert later, aucs
    stop = later[0]
    target = (aucs[stop] + max(v for k, v in aucs.items() if k < stop)) / 2
    out = dlrm("train", *common, f"--train.target_auc={target}", "--run-dir",
               str(tmp_path / "b")).stdout
    (hit,) = events(out, "target_reached")
    assert hit["step"] == stop and hit["auc"] == aucs[stop] >= target, (hit, aucs)
    (done,) = events(out, "done")
    assert done["target_reached"] and done["steps"] == stop
    assert {e["step"]: e["auc"] for e in events(out, "eval")
            if e["split"] == "val" and e["step"] <= stop} == {
        k: v for k, v in aucs.items() if k <= stop}


def test_plan_for_a_cluster_that_does_not_exist():
    out = dlrm("plan", "--config", "configs/criteo_1tb.toml", "--world-size", "8",
               "--device", "cuda", "--hbm-gib", "80").stdout
    (summary,) = events(out, "plan")
    memory = summary["memory_per_rank"]
    assert len(memory) == 8 and sum(m["shards"] for m in memory) >= 26
    assert all(m["hbm_gib"] <= 80 for m in memory)
    # 4 tables of 40M x 128 fp32 rows with exact Adagrad state: ~38 GiB on a rank each.
    assert sorted(m["hbm_gib"] for m in memory)[-1] > 38


def test_plan_that_cannot_fit_says_so():
    proc = subprocess.run([sys.executable, "-m", "dlrm", "plan", "--config",
                           "configs/criteo_1tb.toml", "--world-size", "2", "--device", "cuda",
                           "--hbm-gib", "16", "--ddr-gib", "16"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "no plan fits 2 x cuda" in proc.stderr

"""The planted click model has interactions that a first-order model cannot capture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from helpers import dlrm, quiet

from dlrm.data.loader import ParquetBatches
from dlrm.metrics import auc
from dlrm.preprocess.driver import preprocess
from dlrm.schema.manifest import load_manifest
from dlrm.schema.splits import default_split_specs, resolve_split
from dlrm.synth.criteo import synth

DAYS, ROWS = 3, 150_000


def split_arrays(data: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    manifest = load_manifest(data)
    segments = resolve_split(data, manifest, default_split_specs(manifest)[split])
    labels, dense, ids = [], [], []
    for b in ParquetBatches(segments, 4096, rank=0, world_size=1, pad=True,
                            features=manifest.features):
        keep = b.labels >= 0
        labels.append(b.labels[keep])
        dense.append(b.dense_features[keep])
        ids.append(b.sparse_features.values().view(26, -1).T[keep])
    return torch.cat(labels), torch.cat(dense), torch.cat(ids)


def first_order_auc(data: Path, cardinalities: list[int]) -> float:
    """Logistic regression on one-hot ids + dense features (no interactions), one epoch
    of Adagrad in batches of 1024, like the DLRM it is compared with."""
    torch.manual_seed(0)
    offsets = torch.tensor(np.r_[0, np.cumsum(cardinalities)[:-1]])
    weights = torch.nn.Embedding(sum(cardinalities), 1)
    torch.nn.init.zeros_(weights.weight)
    linear = torch.nn.Linear(13, 1)

    def logit(dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return weights(ids + offsets).sum((1, 2)) + linear(dense).squeeze(-1)

    opt = torch.optim.Adagrad([*weights.parameters(), *linear.parameters()], lr=0.05)
    labels, dense, ids = split_arrays(data, "train")
    for i in range(0, len(labels), 1024):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logit(dense[i:i + 1024], ids[i:i + 1024]), labels[i:i + 1024])
        opt.zero_grad()
        loss.backward()
        opt.step()
    labels, dense, ids = split_arrays(data, "test")
    with torch.no_grad():
        return auc(labels.numpy(), logit(dense, ids).numpy())


def test_interactions_beat_first_order(tmp_path: Path):
    raw, data, run = tmp_path / "raw", tmp_path / "data", tmp_path / "run"
    truth = synth(raw, days=DAYS, rows_per_day=ROWS, seed=11)
    bayes = truth["splits"]["test"]["bayes_auc"]
    manifest = preprocess([raw / f"day_{d}" for d in range(DAYS)], data, workers=2,
                          log=quiet)
    dlrm("train", "--config", "configs/tiny.toml", f"--data.path={data}", "--run-dir", str(run))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    dlrm_auc = [r for r in records if "eval/test/auc" in r][-1]["eval/test/auc"]

    baseline = first_order_auc(data, manifest.cardinalities)
    print(f"bayes {bayes:.4f} dlrm {dlrm_auc:.4f} first-order {baseline:.4f}")
    assert 0.65 < baseline < bayes
    assert dlrm_auc > baseline + 0.03
    assert dlrm_auc < bayes

"""Offline use of a checkpoint: evaluation and batch scoring of a dataset split.

Alone or under torchrun, on any number of ranks whatever the number that trained: the
planner shards the tables for this world and torch.distributed.checkpoint reshards the
saved ones into it. The run's ``config.toml`` (two levels above the checkpoint) gives the
model, read as the run wrote it; the checkpoint's marker gives the table sizes
(``dlrm.train.preflight.checkpoint_inputs`` reads and checks them with the dataset).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dlrm.data.loader import ParquetBatches
from dlrm.data.split_checks import split_specs
from dlrm.metrics import curves, regression_curves, sigmoid, split_metrics
from dlrm.schema.integrity import WRITE
from dlrm.schema.manifest import load_manifest
from dlrm.schema.splits import resolve_split
from dlrm.train.checkpoint import Checkpointer
from dlrm.train.dist import init_distributed, resolve_device
from dlrm.train.evaluate import gather_predictions, predict
from dlrm.train.preflight import checkpoint_inputs
from dlrm.train.sharding import sharded_model
from dlrm.utils.files import atomic_path, atomic_write_json

SPLIT_CHOICES = ("train", "val", "test", "all")


def default_split(data: str | Path) -> str:
    """The split scored when none is named: a dataset made ``--like`` the training data
    is new data, all of it; any other, the run's test split."""
    return "all" if load_manifest(data).like is not None else "test"


class Offline:
    """A checkpoint loaded for inference over one split of a dataset (every rank calls)."""

    def __init__(self, checkpoint: str | Path, data: str | Path, split: str = "test",
                 batch_size: int = 0) -> None:
        self.checkpoint = Path(checkpoint)
        # Checksums are checked by every rank together when the state is loaded.
        inputs = checkpoint_inputs(self.checkpoint, data, split)
        config, manifest = inputs.config, inputs.manifest
        features = manifest.features
        # The run's device where this host has it (a GPU-trained run evaluates on CPU too).
        device = resolve_device(config.train.device if torch.cuda.is_available() else "cpu")
        self.dist = init_distributed(device, config.train.collective_timeout_s)
        bs = batch_size or config.eval.batch_size or config.data.batch_size
        self.model, _, _ = sharded_model(config, features, inputs.sizes, self.dist.device, bs,
                                         inference=True, evictions=manifest.evictions)
        state = {"model": self.model.state_dict()}
        Checkpointer(self.checkpoint.parent).load(self.checkpoint, state)
        self.model.load_state_dict(state["model"])
        self.step = inputs.position["step"]
        self.label_kind = features.label_kind
        self.config, self.manifest, self.features, self.batch_size = config, manifest, features, bs
        self.segments = resolve_split(data, manifest, inputs.specs)
        self.split_specs = split_specs(config.data, manifest)
        self.batches = ParquetBatches(
            self.segments, bs, self.dist.rank, self.dist.world_size, pad=True,
            features=features, multi_hot_sizes=config.data.multi_hot_sizes,
            cardinalities=manifest.id_limits, multi_hot_seed=config.data.multi_hot_seed)

    def predictions(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(labels, logits) of the whole split in row order on rank 0; None elsewhere."""
        return gather_predictions(*predict(self.model, self.batches, self.dist.device))


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, split: str = "test",
                        out: str | Path | None = None, batch_size: int = 0,
                        ) -> dict[str, Any] | None:
    """Exact metrics (and for a binary label, curves) of ``split``; rank 0 returns them
    (and writes ``out``)."""
    offline = Offline(checkpoint, data, split, batch_size)
    got = offline.predictions()
    if got is None:
        return None
    labels, logits = got
    kind = offline.label_kind
    report = {"checkpoint": str(offline.checkpoint), "step": offline.step, "data": str(data),
              "split": split, "world_size": offline.dist.world_size,
              "metrics": split_metrics(kind, labels, logits)}
    report["curves"] = curves(labels, logits) if kind == "binary" \
        else regression_curves(labels, logits)
    if out is not None:
        atomic_write_json(Path(out), report)
    return report


def score_checkpoint(checkpoint: str | Path, data: str | Path, out: str | Path,
                     split: str = "test", batch_size: int = 0) -> int | None:
    """Writes Parquet ``row``, ``label``, ``prob`` (a regression label: ``label`` and
    ``prediction``, numbers) for every row of ``split`` (rank 0, atomically); returns the
    number of rows there, None on other ranks."""
    offline = Offline(checkpoint, data, split, batch_size)
    got = offline.predictions()
    if got is None:
        return None
    labels, logits = got
    rows = pa.array(np.arange(len(labels), dtype=np.int64))
    if offline.label_kind == "regression":
        table = pa.table({"row": rows, "label": pa.array(labels.astype(np.float32)),
                          "prediction": pa.array(logits.astype(np.float32))})
    else:
        table = pa.table({"row": rows, "label": pa.array(labels.astype(np.int8)),
                          "prob": pa.array(sigmoid(logits))})
    with atomic_path(Path(out)) as tmp:
        pq.write_table(table, tmp, **WRITE)
    return len(labels)


def format_metrics(metrics: dict[str, float]) -> str:
    """The metrics as an aligned two-column table."""
    width = max(len(k) for k in metrics)
    return "\n".join(f"{k:<{width}}  {v:.6f}" if isinstance(v, float) else f"{k:<{width}}  {v}"
                     for k, v in metrics.items())

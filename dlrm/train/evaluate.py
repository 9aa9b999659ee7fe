"""Distributed evaluation: predictions of all ranks gathered, exact metrics on the whole split."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torchrec.datasets.utils import Batch
from torchrec.distributed.train_pipeline import EvalPipelineSparseDist

from dlrm.data.loader import PAD_LABEL
from dlrm.metrics import curves as split_curves
from dlrm.metrics import regression_curves, split_metrics
from dlrm.train.dist import broadcast_object


@torch.no_grad()
def predict(model: torch.nn.Module, batches: Iterable[Batch], device: torch.device,
            limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of this rank's batches; ``model`` is a sharded ``DLRMTrain``.

    Through TorchRec's evaluation pipeline, as training runs through its own: the next
    batch is copied to the device by a background thread and its features exchanged
    (input all-to-all) while the current one is scored. Every rank must have the same
    number of batches (the evaluation loader pads).
    """
    was_training = model.training
    model.eval()
    # The pipeline rewrites the sharded modules' forward for the overlap; detach()
    # restores it. Its optimizer is never used in eval mode.
    pipeline = EvalPipelineSparseDist(model, optimizer=None, device=device)
    batches = itertools.islice(batches, limit) if limit else iter(batches)
    logits, labels = [], []
    try:
        while True:
            try:
                _, batch_logits, batch_labels = pipeline.progress(batches)
            except StopIteration:
                break
            logits.append(batch_logits.float())
            labels.append(batch_labels.float())
    finally:
        pipeline.reset()  # stops its copy thread
        pipeline.detach()
        model.train(was_training)
    if not logits:
        return torch.zeros(0, device=device), torch.zeros(0, device=device)
    return torch.cat(logits), torch.cat(labels)


def gather_predictions(logits: torch.Tensor, labels: torch.Tensor,
                       ) -> tuple[np.ndarray, np.ndarray] | None:
    """(labels, logits) of all ranks, in rank order, as float64 on rank 0; None elsewhere.

    Every rank must hold the same number of predictions (the evaluation loader pads);
    padding rows (label ``PAD_LABEL``) are dropped, so row i is the split's row i.
    """
    world = dist.get_world_size()
    both = torch.stack([logits, labels])
    gathered = [torch.empty_like(both) for _ in range(world)]
    dist.all_gather(gathered, both)
    if dist.get_rank() != 0:
        return None
    allp = torch.cat(gathered, dim=1).double().cpu().numpy()
    keep = allp[1] != PAD_LABEL
    return allp[1][keep], allp[0][keep]


def gather_metrics(logits: torch.Tensor, labels: torch.Tensor, curves: bool = False,
                   kind: str = "binary") -> dict[str, Any]:
    """Exact metrics over the predictions of all ranks together (computed on rank 0,
    the same on every rank); with ``curves``, also the ROC and calibration curves of a
    binary label, or a regression's predicted-against-actual and residual curves."""
    got = gather_predictions(logits, labels)
    result = None
    if got is not None:
        y, z = got
        result = split_metrics(kind, y, z)
        if curves:
            result["curves"] = split_curves(y, z) if kind == "binary" \
                else regression_curves(y, z)
    return broadcast_object(result)


def evaluate(model: torch.nn.Module, batches: Iterable[Batch], device: torch.device,
             limit: int = 0, curves: bool = False, kind: str = "binary") -> dict[str, Any]:
    """The metrics of a split (see :func:`gather_metrics`), identical on every rank."""
    return gather_metrics(*predict(model, batches, device, limit), curves=curves, kind=kind)

"""Distributed evaluation: predictions of all ranks gathered, exact metrics on the whole split."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torchrec.datasets.utils import Batch

from dlrm.data.loader import PAD_LABEL
from dlrm.dist import broadcast_object
from dlrm.metrics import binary_metrics


@torch.no_grad()
def predict(model: torch.nn.Module, batches: Iterable[Batch], device: torch.device,
            limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of this rank's batches; ``model`` is a (sharded) ``DLRMTrain``."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for i, batch in enumerate(batches):
        if limit and i >= limit:
            break
        _, (_, batch_logits, batch_labels) = model(batch.to(device))
        logits.append(batch_logits.float())
        labels.append(batch_labels.float())
    model.train(was_training)
    if not logits:
        return torch.zeros(0, device=device), torch.zeros(0, device=device)
    return torch.cat(logits), torch.cat(labels)


def gather_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Exact metrics over the predictions of all ranks together (computed on rank 0).

    Every rank must hold the same number of predictions (the evaluation loader pads);
    padding rows (label ``PAD_LABEL``) are dropped before computing.
    """
    world = dist.get_world_size()
    both = torch.stack([logits, labels])
    gathered = [torch.empty_like(both) for _ in range(world)]
    dist.all_gather(gathered, both)
    result = None
    if dist.get_rank() == 0:
        allp = torch.cat(gathered, dim=1).double().cpu().numpy()
        keep = allp[1] != PAD_LABEL
        result = binary_metrics(allp[1][keep], allp[0][keep])
    return broadcast_object(result)


def evaluate(model: torch.nn.Module, batches: Iterable[Batch], device: torch.device,
             limit: int = 0) -> dict[str, float]:
    """AUC, log loss, CTRs and row count of a split, identical on every rank."""
    return gather_metrics(*predict(model, batches, device, limit))


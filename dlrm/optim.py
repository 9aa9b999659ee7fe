"""Optimizers: the fused embedding optimizer (applied in backward) and the dense one."""

from __future__ import annotations

from typing import Any

import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from dlrm.config import OptimConfig


def _embedding_optimizer(cfg: OptimConfig) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    # torchrec maps these classes onto fbgemm's fused kernels: RowWiseAdagrad →
    # EXACT_ROWWISE_ADAGRAD, Adagrad → EXACT_ADAGRAD (torchrec_dlrm / MLPerf), SGD → EXACT_SGD.
    if cfg.embedding_optimizer == "rowwise_adagrad":
        return RowWiseAdagrad, {"lr": cfg.embedding_lr, "eps": cfg.eps}
    if cfg.embedding_optimizer == "adagrad":
        return torch.optim.Adagrad, {"lr": cfg.embedding_lr, "eps": cfg.eps}
    return torch.optim.SGD, {"lr": cfg.embedding_lr}


def apply_embedding_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> None:
    """Attaches the embedding optimizer to every EmbeddingBagCollection, to run in backward.

    Must be called before sharding: DistributedModelParallel fuses it into the kernels.
    """
    cls, kwargs = _embedding_optimizer(cfg)
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            apply_optimizer_in_backward(cls, module.parameters(), kwargs)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> CombinedOptimizer:
    """The dense optimizer over every parameter not handled in backward, combined with the
    sharded model's fused embedding optimizer (whose ``step`` is a no-op)."""
    dense = dict(in_backward_optimizer_filter(model.named_parameters()))
    if cfg.dense_optimizer == "adagrad":
        dense_opt = KeyedOptimizerWrapper(
            dense, lambda ps: torch.optim.Adagrad(ps, lr=cfg.dense_lr, eps=cfg.eps))
    else:
        dense_opt = KeyedOptimizerWrapper(dense, lambda ps: torch.optim.SGD(ps, lr=cfg.dense_lr))
    return CombinedOptimizer([("embedding", model.fused_optimizer), ("dense", dense_opt)])

"""Optimizers: the fused embedding optimizer (applied in backward) and the dense one."""

from __future__ import annotations

from typing import Any

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_training import WeightDecayMode
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from dlrm.config import OptimConfig


def _embedding_optimizer(cfg: OptimConfig) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    # torchrec maps these classes onto fbgemm's fused kernels: RowWiseAdagrad →
    # EXACT_ROWWISE_ADAGRAD, Adagrad → EXACT_ADAGRAD (torchrec_dlrm / MLPerf), Adam → ADAM,
    # SGD → EXACT_SGD.
    decay = {"weight_decay": cfg.embedding_weight_decay} if cfg.embedding_weight_decay else {}
    if cfg.embedding_optimizer == "rowwise_adagrad":
        return RowWiseAdagrad, {"lr": cfg.embedding_lr, "eps": cfg.eps, **decay}
    if cfg.embedding_optimizer == "adagrad":
        return torch.optim.Adagrad, {"lr": cfg.embedding_lr, "eps": cfg.eps, **decay}
    if cfg.embedding_optimizer == "adam":
        return torch.optim.Adam, {"lr": cfg.embedding_lr, "eps": cfg.eps, **decay}
    return torch.optim.SGD, {"lr": cfg.embedding_lr}


CPU_EMBEDDING_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")


def apply_embedding_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> None:
    """Attaches the embedding optimizer to every EmbeddingBagCollection, to run in backward.

    Must be called before sharding: DistributedModelParallel fuses it into the kernels.
    """
    cls, kwargs = _embedding_optimizer(cfg)
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            apply_optimizer_in_backward(cls, module.parameters(), kwargs)
            if "weight_decay" in kwargs:
                # fbgemm applies weight_decay only in a weight_decay_mode, which the torch
                # optimizer built here would refuse: it goes to the kernel's arguments,
                # which the sharder reads from each parameter's kwargs.
                for param in module.parameters():
                    param._optimizer_kwargs[0]["weight_decay_mode"] = WeightDecayMode.L2


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> CombinedOptimizer:
    """The dense optimizer over every parameter not handled in backward, combined with the
    sharded model's fused embedding optimizer (whose ``step`` is a no-op)."""
    dense = dict(in_backward_optimizer_filter(model.named_parameters()))
    # fused: one kernel over all parameters instead of a handful of ops per tensor (on
    # CPU 4x faster for Adagrad, which is much of a step's overhead beside the MLPs).
    wd = cfg.weight_decay
    make = {
        "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=cfg.dense_lr, eps=cfg.eps,
                                                  weight_decay=wd, fused=True),
        "adam": lambda ps: torch.optim.Adam(ps, lr=cfg.dense_lr, eps=cfg.eps, weight_decay=wd,
                                            fused=True),
        "sgd": lambda ps: torch.optim.SGD(ps, lr=cfg.dense_lr, weight_decay=wd, fused=True),
    }[cfg.dense_optimizer]
    dense_opt = KeyedOptimizerWrapper(dense, make)
    return CombinedOptimizer([("embedding", model.fused_optimizer), ("dense", dense_opt)])


def init_dense_state(optimizer: CombinedOptimizer) -> None:
    """Creates the dense optimizer's state (zero moments: a step with zero gradients,
    which moves no parameter), so that a checkpoint's state can be loaded into it. The
    fused embedding optimizer has its state from the start, and is left alone: this
    would allocate a gradient the size of every table."""
    for name, optimizer_part in optimizer.optimizers:
        if name == "dense":
            optimizer_part.init_state()
            for param in optimizer_part.params.values():
                param.grad = None
            # Plain SGD's step leaves a None momentum per parameter, which a checkpoint
            # does not hold (nothing to save) and DCP would look for: drop them again.
            state = optimizer_part.state
            for param in [p for p, slots in state.items()
                          if all(v is None for v in slots.values())]:
                del state[param]


def lr_scale(update: int, cfg: OptimConfig) -> float:
    """The factor on the base learning rates for the ``update``-th optimizer step (from 1),
    as MLPerf's DLRM reference defines it: linear warmup ``update / warmup_steps`` while
    ``update < warmup_steps``; 1 until ``decay_start``; then for the k-th update after it
    (k from 0) ``((decay_steps - k) / decay_steps) ** decay_power``, held at its last value
    once ``decay_steps`` updates have decayed."""
    if cfg.warmup_steps and update < cfg.warmup_steps:
        return update / cfg.warmup_steps
    if cfg.decay_steps and update > cfg.decay_start:
        k = min(update - cfg.decay_start - 1, cfg.decay_steps - 1)
        return ((cfg.decay_steps - k) / cfg.decay_steps) ** cfg.decay_power
    return 1.0


class LRSchedule:
    """Sets the learning rate of every param group (fused embedding ones included: torchrec
    hands the group's ``lr`` to the kernels at ``zero_grad``, before each backward)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
        self.optimizer, self.cfg = optimizer, cfg
        self.base = [group["lr"] for group in optimizer.param_groups]

    def set_step(self, step: int) -> None:
        """Sets the rates for the update after ``step`` updates have been made."""
        scale = lr_scale(step + 1, self.cfg)
        for group, base in zip(self.optimizer.param_groups, self.base, strict=True):
            group["lr"] = base * scale

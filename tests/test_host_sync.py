"""The training loop reads nothing back from the device between logging steps.

On a GPU a read of a device tensor (``.item()``, ``.tolist()``, ``bool()``, ``.cpu()``...)
blocks the host until the device has caught up, so the host can no longer queue work
ahead of it. Here, on CPU, every such call made by dlrm's own code is counted, by step,
while a real (world size 1) training runs; steps that log or evaluate may read.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from dlrm.config import load_config
from dlrm.train.trainer import Trainer

DLRM = str(Path(__file__).resolve().parent.parent / "dlrm") + "/"
READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu,
         torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
         torch.Tensor.__index__, torch.Tensor.__array__}


class CountReads(TorchFunctionMode):
    """Counts tensor reads whose caller is a file of the dlrm package, by training step."""

    def __init__(self, trainer: Trainer) -> None:
        super().__init__()
        self.trainer, self.by_step = trainer, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS:
            caller = sys._getframe(1)
            while caller and "/torch/" in caller.f_code.co_filename:
                caller = caller.f_back
            if caller and caller.f_code.co_filename.startswith(DLRM):
                where = f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno}"
                self.by_step.setdefault(self.trainer.step, []).append(where)
        return func(*args, **(kwargs or {}))


def test_no_host_synchronising_read_per_step(small_dataset, tmp_path):
    config = load_config("configs/tiny.toml", [
        f"--data.path={small_dataset}", "--data.batch_size=64", "--model.embedding_dim=8",
        "--model.dense_arch_layer_sizes=[16,8]", "--model.over_arch_layer_sizes=[16,1]",
        "--train.limit_train_batches=60", "--train.log_every=20", "--train.device=cpu",
        "--eval.limit_batches=2"])
    trainer = Trainer(config, tmp_path / "run")
    try:
        with CountReads(trainer) as reads:
            trainer.train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    logging_steps = {20, 40, 60}  # 60: also the last step (final log, checkpoint, evaluation)
    assert logging_steps <= reads.by_step.keys()  # the count sees the reads that are there
    per_step = {s: where for s, where in reads.by_step.items() if s not in logging_steps}
    assert per_step == {}, f"reads between logging steps (step: file:line): {per_step}"

"""Process group set-up: the same code under torchrun (N ranks) or alone (world size 1)."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int  # global rank: data and logging depend on this, never on the local rank
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def quiet_third_party() -> None:
    """Silences warnings torch / torchrec print once per rank that say nothing about the run."""
    warnings.filterwarnings("ignore", message=".*`broadcast_buffers` is deprecated")
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def init_distributed(device: str = "auto") -> DistInfo:
    """Starts the default process group: NCCL on GPU, gloo on CPU.

    Under torchrun the rank and world size come from its environment; without it this
    is a world of one (in-memory store, nothing to rendezvous with).
    """
    quiet_third_party()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device = 'cuda' but no CUDA device is available")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        # torchrun pins OMP threads to 1; share this host's cores between its ranks instead.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def broadcast_object(obj: object, src: int = 0) -> object:
    """``obj`` of rank ``src`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]

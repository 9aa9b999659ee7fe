"""Process group set-up: the same code under torchrun (N ranks) or alone (world size 1)."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dlrm.utils.heap import keep_freed_memory


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
    # torchrec 1.8 still shards tables as ShardedTensor; DCP warns on every one of them.
    warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` where a GPU is visible, else ``cpu``; others unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Starts the default process group: NCCL on GPU, gloo on CPU.

    Under torchrun the rank and world size come from its environment; without it this
    is a world of one (in-memory store, nothing to rendezvous with). ``timeout_s`` bounds
    every collective (``train.collective_timeout_s``). On GPU the group is bound to this
    rank's device (``device_id``), so NCCL never guesses it from the rank.
    """
    quiet_third_party()
    keep_freed_memory()  # every step allocates and frees the same buffers
    use_cuda = resolve_device(device) == "cuda"
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
        options = {"backend": backend, "timeout": timedelta(seconds=timeout_s),
                   **({"device_id": dev} if use_cuda else {})}
        if "RANK" in os.environ:
            dist.init_process_group(store=_attempt_store(), rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]), **options)
        else:
            dist.init_process_group(store=dist.HashStore(), rank=0, world_size=1, **options)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def barrier() -> None:
    """A barrier of the default group. On NCCL it names this rank's GPU: without
    ``device_ids`` NCCL guesses the device from the rank, and warns that it may hang."""
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def _attempt_store() -> dist.Store | None:
    """The rendezvous store of this torchrun attempt, isolated from earlier attempts.

    torchrun's agent keeps one store for all restarts (``TORCHELASTIC_USE_AGENT_STORE``),
    so the addresses that the ranks of a killed attempt published are still there when
    the next attempt starts, and gloo / NCCL may connect to a dead rank
    (pytorch/pytorch#135712). On one node every rank sees the same restart count, so
    it makes a prefix private to the attempt. Across nodes the counts can differ; there
    launch with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` instead (a fresh store per
    attempt), as ``dlrm/components.py`` does. None: the default ``env://`` store.
    """
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or \
            env.get("LOCAL_WORLD_SIZE") != env.get("WORLD_SIZE"):
        return None
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]),
                          int(env["WORLD_SIZE"]), is_master=False)
    return dist.PrefixStore(f"dlrm/attempt-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}",
                            store)


def broadcast_object(obj: object, src: int = 0) -> object:
    """``obj`` of rank ``src`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order, on every rank."""
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out

"""Planner-chosen sharding of the embedding tables with DistributedModelParallel."""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.fbgemm_qcomm_codec import (
    CommType,
    QCommsConfig,
    get_qcomm_codecs_registry,
)
from torchrec.distributed.mc_embeddingbag import ManagedCollisionEmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import (
    DefaultDataParallelWrapper,
    DistributedModelParallel,
)
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import (
    HardwareConfig,
    KernelConfig,
    ParameterConstraints,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType

from dlrm.config import SHARDING_TYPES, Config, OptimConfig, ShardingConfig
from dlrm.schema.features import Features
from dlrm.train.model import autocast_dense, build_model, table_name
from dlrm.train.optim import apply_embedding_optimizer
from dlrm.utils import host

# Never data_parallel: torchrec trains a data-parallel table with the dense optimizer (its
# parameters are ordinary DDP parameters), not with the fused embedding optimizer, so
# a plan choosing it would silently change how that table learns. Types the sharder
# cannot run on this device (row_wise on CPU) are dropped by the planner.

GIB = 1 << 30
_COMM = {"fp32": CommType.FP32, "fp16": CommType.FP16, "bf16": CommType.BF16}


def table_constraints(cfg: ShardingConfig, tables: list[str]) -> dict[str, ParameterConstraints]:
    """Allowed sharding types per table: ``sharding_types`` (all types if empty), unless
    ``table_sharding_types`` names the table's feature (table ``t_C20`` ↔ feature ``C20``);
    the allowed compute kernels and the narrowest column shard, the same for every table."""
    types = list(cfg.sharding_types or SHARDING_TYPES)
    return {t: ParameterConstraints(
                sharding_types=list(cfg.table_sharding_types.get(t.removeprefix("t_"), types)),
                compute_kernels=list(cfg.compute_kernels) or None,
                min_partition=cfg.column_shard_dim or None)
            for t in tables}


ROW_WISE, FUSED = ShardingType.ROW_WISE.value, EmbeddingComputeKernel.FUSED.value


class RowWiseOnCPUSharder(EmbeddingBagCollectionSharder):
    """torchrec's EmbeddingBagCollection sharder that also offers row-wise sharding (with
    the fused kernel) on CPU, where torchrec offers it on CUDA only: the one sharding its
    managed-collision sharder takes (checked on 2 gloo ranks: plans, trains with the fused
    optimizer, checkpoints and resumes)."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        return types if ROW_WISE in types else [*types, ROW_WISE]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        if compute_device_type == "cpu" and sharding_type == ROW_WISE:
            return [FUSED]
        return super().compute_kernels(sharding_type, compute_device_type)


def managed_constraints(tables: list[str]) -> dict[str, ParameterConstraints]:
    """Managed tables: row-wise with the fused kernel (their collision modules' sharding;
    its wrapper also offers UVM kernels the CPU estimator does not know)."""
    return {t: ParameterConstraints(sharding_types=[ROW_WISE], compute_kernels=[FUSED])
            for t in tables}


def sharders(cfg: ShardingConfig, device: torch.device,
             managed: bool = False) -> list[ModuleSharder]:
    """The EmbeddingBagCollection sharder (``managed``: the managed-collision one around
    it), with quantized all-to-all codecs if configured."""
    codecs = None
    if (cfg.a2a_forward_precision, cfg.a2a_backward_precision) != ("fp32", "fp32"):
        codecs = get_qcomm_codecs_registry(
            QCommsConfig(forward_precision=_COMM[cfg.a2a_forward_precision],
                         backward_precision=_COMM[cfg.a2a_backward_precision]),
            device=device)
    if managed:
        return [ManagedCollisionEmbeddingBagCollectionSharder(
            ebc_sharder=RowWiseOnCPUSharder(qcomm_codecs_registry=codecs),
            qcomm_codecs_registry=codecs)]
    return [EmbeddingBagCollectionSharder(qcomm_codecs_registry=codecs)]


@dataclass
class Planner:
    """The planner for a cluster that need not exist: world size, ranks per host, device
    type and per-rank memory. ``sharding.hbm_gib`` / ``ddr_gib`` set the memory the planner
    may fill (torchrec_dlrm leaves it at torchrec's built-in default, wrong for every GPU);
    0 means this device's own HBM and this host's memory shared by its ranks (in a
    container, its cgroup's memory limit where that is smaller)."""

    cfg: ShardingConfig
    world_size: int
    local_world_size: int
    device_type: str
    batch_size: int

    def hbm_bytes(self) -> int:
        if self.cfg.hbm_gib:
            return int(self.cfg.hbm_gib * GIB)
        if self.device_type == "cuda" and torch.cuda.is_available():
            return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        return 0

    def ddr_bytes(self) -> int:
        return int(self.cfg.ddr_gib * GIB) if self.cfg.ddr_gib else \
            host.memory_bytes() // self.local_world_size

    def build(self, tables: list[str],
              constraints: dict[str, ParameterConstraints] | None = None,
              ) -> EmbeddingShardingPlanner:
        """The planner; ``constraints`` replace those of the config when given."""
        topology = TopologyFactory.create_topology(
            trainer_config=TrainerConfig(world_size=self.world_size,
                                         local_world_size=self.local_world_size),
            hardware_config=HardwareConfig(hbm_cap_bytes=self.hbm_bytes() or None,
                                           ddr_cap_bytes=self.ddr_bytes()),
            kernel_config=KernelConfig(compute_device=self.device_type),
        )
        return EmbeddingShardingPlanner(
            topology=topology, batch_size=self.batch_size,
            constraints=constraints or table_constraints(self.cfg, tables), debug=False,
            # A fixed 15% reserve for dense parameters, activations and KJTs, as torchrec
            # recommends over its heuristic (which overestimates on meta-device models).
            storage_reservation=FixedPercentageStorageReservation(0.15),
        )


# A CPU rank's own footprint beside its tables and dense model: Python, torch, torchrec
# and fbgemm loaded, gloo, the loader's batches, evaluation buffers. Measured on the CPU
# stack (torch 2.13, torchrec 1.8, fbgemm-gpu-cpu 1.8): a rank holding 0.12 GiB of tables
# and a small dense model peaked at 0.71 GiB (scripts/bench_large_table.py).
RUNTIME_GIB = 0.6
# Bytes of memory per byte of dense parameter: itself, its gradient, DDP's bucket and
# up to two optimizer states (Adam).
DENSE_COPIES = 5


def dense_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters of an unsharded ``model`` outside its embedding tables."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if "embedding_bag_collection" not in n)


def memory_per_rank(planner: EmbeddingShardingPlanner, world_size: int,
                    dense: int) -> list[dict[str, float]]:
    """Each rank's memory in GiB: the planner's estimate of its embedding storage (tables,
    optimizer state, lookup buffers; ``hbm`` on GPU, ``ddr`` on CPU), the replicated dense
    part (``dense`` bytes of parameters) with its gradients and optimizer state (``dense``), and
    ``total``: what the rank needs of its device's memory (on CPU: its peak resident
    memory, the runtime's own included). Only where ``plan`` ran."""
    hbm, ddr, shards = defaultdict(int), defaultdict(int), defaultdict(int)
    for option in planner._best_plan or []:
        for shard in option.shards:
            hbm[shard.rank] += shard.storage.hbm
            ddr[shard.rank] += shard.storage.ddr
            shards[shard.rank] += 1
    dense_gib = DENSE_COPIES * dense / GIB
    gpu = planner._topology.compute_device == "cuda"
    return [{"rank": r, "hbm_gib": round(hbm[r] / GIB, 3), "ddr_gib": round(ddr[r] / GIB, 3),
             "dense_gib": round(dense_gib, 3), "total_gib": round(
                 (hbm[r] / GIB if gpu else ddr[r] / GIB + RUNTIME_GIB) + dense_gib, 3),
             "shards": shards[r]} for r in range(world_size)]


def describe(plan: ShardingPlan, memory: list[dict[str, float]], planner: Planner) -> str:
    """The plan as text: per-table sharding and placement, then memory per rank."""
    lines = [str(plan), "",
             f"world size {planner.world_size} ({planner.local_world_size} per host), "
             f"device {planner.device_type}, per rank: "
             f"HBM {planner.hbm_bytes() / GIB:.1f} GiB, DDR {planner.ddr_bytes() / GIB:.1f} GiB",
             "estimated memory per rank: embedding storage (tables + optimizer state + "
             "buffers), the dense model (with gradients and optimizer state), and in all "
             f"(on {'GPU: HBM' if planner.device_type == 'cuda' else 'CPU: peak RSS'}):"]
    lines += [f"  rank {m['rank']}: HBM {m['hbm_gib']:.3f} GiB, DDR {m['ddr_gib']:.3f} GiB, "
              f"dense {m['dense_gib']:.3f} GiB, total {m['total_gib']:.3f} GiB, "
              f"{m['shards']} shards" for m in memory]
    return "\n".join(lines) + "\n"


def plan_offline(model: torch.nn.Module, tables: list[str], spec: Planner,
                 managed: bool = False) -> tuple[str, list[dict[str, float]]]:
    """The plan and memory per rank for the cluster ``spec`` describes, without one: the
    planner needs only the topology and the (meta-device) model. Raises torchrec's
    PlannerError when the tables do not fit."""
    planner = spec.build(tables, managed_constraints(tables) if managed else None)
    plan = planner.plan(model, sharders(spec.cfg, torch.device(spec.device_type), managed))
    memory = memory_per_rank(planner, spec.world_size, dense_bytes(model))
    return describe(plan, memory, spec), memory


def shard_model(model: torch.nn.Module, tables: list[str], cfg: ShardingConfig,
                device: torch.device, batch_size: int,
                constraints: dict[str, ParameterConstraints] | None = None,
                managed: bool = False,
                ) -> tuple[DistributedModelParallel, str, list[dict[str, float]]]:
    """Plans (on rank 0, broadcast, so every rank gets the same plan) and shards ``model``.

    The embedding tables are placed per the plan and exchanged by all-to-all; the rest
    of the model is replicated and wrapped in DDP (with the configured all-reduce codec).
    Returns the sharded model, the plan as text and the memory estimate per rank (the
    latter two complete on rank 0).
    """
    world_size = dist.get_world_size()
    spec = Planner(cfg, world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
                   device.type, batch_size)
    planner = spec.build(tables, managed_constraints(tables) if managed else constraints)
    chosen = sharders(cfg, device, managed)
    dense = dense_bytes(model)
    plan = planner.collective_plan(model, chosen, dist.GroupMember.WORLD)
    # torchrec's DDP wrapper registers the fp16 / bf16 compression hook itself.
    precision = None if cfg.allreduce_precision == "fp32" else cfg.allreduce_precision
    dmp = DistributedModelParallel(
        module=model, device=device, plan=plan, sharders=chosen,
        data_parallel_wrapper=DefaultDataParallelWrapper(allreduce_comm_precision=precision))
    memory = memory_per_rank(planner, world_size, dense)
    return dmp, describe(plan, memory, spec), memory


# Scoring needs no optimizer state: SGD holds none and has a kernel on every device.
INFERENCE_OPTIM = OptimConfig(embedding_optimizer="sgd")


def sharded_model(config: Config, features: Features, sizes: list[int], device: torch.device,
                  batch_size: int, inference: bool = False,
                  evictions: dict[str, str] | None = None,
                  ) -> tuple[DistributedModelParallel, str, list[dict[str, float]]]:
    """The DLRM of ``config`` over ``features``, with tables of ``sizes`` rows, built on the
    meta device, its embedding optimizer fused, sharded by the planner over this process
    group (see :func:`shard_model` for what is returned).

    ``inference``: for scoring a checkpoint (``dlrm evaluate``, ``dlrm score``) on whatever
    device this host has: the embedding optimizer is SGD, which holds no state and has a
    kernel on every device, and bf16 autocast applies on a GPU only. ``config`` itself, the
    run's, is read as it is. ``evictions``: the features are managed (see
    ``model.managed_tables``), one bucket per rank."""
    model = build_model(config.model, features, sizes, device, evictions=evictions,
                        buckets=dist.get_world_size())
    if config.train.autocast == "bf16" and (device.type == "cuda" or not inference):
        autocast_dense(model, device)
    apply_embedding_optimizer(model, INFERENCE_OPTIM if inference else config.optim)
    tables = [table_name(f) for f in features.sparse]
    return shard_model(model, tables, config.sharding, device, batch_size,
                       managed=bool(evictions))

"""Planner-chosen sharding of the embedding tables with DistributedModelParallel."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import (
    KernelConfig,
    ParameterConstraints,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import ShardingPlan

from dlrm.config import SHARDING_TYPES, ShardingConfig

# Never data_parallel: torchrec trains a data-parallel table with the dense optimizer (its
# parameters are ordinary DDP parameters), not with the fused embedding optimizer, so
# a plan choosing it would silently change how that table learns. Types the sharder
# cannot run on this device (row_wise on CPU) are dropped by the planner.


def table_constraints(cfg: ShardingConfig, tables: list[str]) -> dict[str, ParameterConstraints]:
    """The same allowed sharding types for every table (from config)."""
    types = list(cfg.sharding_types or SHARDING_TYPES)
    return {t: ParameterConstraints(sharding_types=types) for t in tables}


def shard_model(model: torch.nn.Module, constraints: dict[str, ParameterConstraints],
                device: torch.device, batch_size: int,
                ) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Plans (collectively, so every rank gets the same plan) and shards ``model``.

    The embedding tables are placed per the plan and exchanged by all-to-all; the rest
    of the model is replicated and wrapped in DDP.
    """
    world_size = dist.get_world_size()
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=world_size, local_world_size=local_world_size),
        kernel_config=KernelConfig(compute_device=device.type),
    )
    planner = EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size, constraints=constraints, debug=False,
        # A fixed 15% reserve for dense parameters, activations and KJTs, as torchrec
        # recommends over its heuristic (which overestimates on meta-device models).
        storage_reservation=FixedPercentageStorageReservation(0.15),
    )
    sharders = [EmbeddingBagCollectionSharder()]
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(module=model, device=device, plan=plan, sharders=sharders)
    return dmp, plan

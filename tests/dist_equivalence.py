"""One rank of the sharded-vs-unsharded equivalence check (run by tests/test_distributed.py).

Every rank trains the DMP-sharded DLRM with the product's own pieces (build_model,
apply_embedding_optimizer, shard_model, build_optimizer, TrainPipelineSparseDist) on its
part of each global batch; rank 0 also trains a single-process unsharded copy with the
same initial weights on the whole global batch (both ranks' batches concatenated).

Semantics checked: DDP averages dense gradients over ranks, and torchrec's all-to-all
backward divides the embedding gradients by world_size (comm_ops gradient division),
so embedding gradients are averaged too: the unsharded reference on the global batch
must match with the same learning rates. A reference whose embedding gradients are
summed over ranks (learning rate times world_size) runs beside it as a control that
must diverge, which shows the check can tell the two apart.

Usage: torchrun --nproc_per_node 2 tests/dist_equivalence.py DATASET OUT.json STEPS SHARDING
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.datasets.utils import Batch
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm.config import ModelConfig, OptimConfig, ShardingConfig
from dlrm.data.loader import ParquetBatches
from dlrm.schema.features import SPARSE_NAMES
from dlrm.schema.manifest import load_manifest
from dlrm.schema.splits import resolve_split
from dlrm.train.dist import init_distributed
from dlrm.train.model import build_model, table_name
from dlrm.train.optim import apply_embedding_optimizer, build_optimizer
from dlrm.train.sharding import shard_model

BATCH = 64
DENSE_LR = 0.05
EMBEDDING_LR = 1.0  # large, so that a wrong embedding update shows in the losses
MIXED = ["table_wise", "column_wise", "table_column_wise"]


def concat(batches: list[Batch]) -> Batch:
    """The global batch: ranks' batches one after the other."""
    kjts = [b.sparse_features for b in batches]
    per_key = [torch.cat([k[key].values() for k in kjts]) for key in SPARSE_NAMES]
    lengths = [torch.cat([k[key].lengths() for k in kjts]) for key in SPARSE_NAMES]
    return Batch(
        dense_features=torch.cat([b.dense_features for b in batches]),
        sparse_features=KeyedJaggedTensor.from_lengths_sync(
            keys=SPARSE_NAMES, values=torch.cat(per_key), lengths=torch.cat(lengths)),
        labels=torch.cat([b.labels for b in batches]),
    )


def copy_into_sharded(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copies an unsharded state dict into a DMP model, each rank its own shards."""
    with torch.no_grad():
        for key, value in model.state_dict().items():
            src = full[key]
            if isinstance(value, ShardedTensor):
                for shard in value.local_shards():
                    rows, cols = shard.metadata.shard_offsets
                    n, d = shard.metadata.shard_sizes
                    shard.tensor.copy_(src[rows:rows + n, cols:cols + d])
            else:
                value.copy_(src)


def gather_full(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The DMP model's state as full tensors, on rank 0 (None elsewhere)."""
    local = {}
    for key, value in model.state_dict().items():
        if isinstance(value, ShardedTensor):
            shards = [(s.metadata.shard_offsets, s.tensor.detach().clone())
                      for s in value.local_shards()]
            local[key] = ("sharded", list(value.size()), shards)
        else:
            local[key] = ("full", value.detach().clone())
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, local)
    if dist.get_rank() != 0:
        return None
    out = {}
    for key, (kind, *rest) in everything[0].items():
        if kind == "full":
            out[key] = rest[0]
            continue
        full = torch.full(rest[0], float("nan"))
        for rank_state in everything:
            for (r, c), t in rank_state[key][2]:
                full[r:r + t.shape[0], c:c + t.shape[1]] = t
        out[key] = full
    return out


def main() -> None:
    dataset, out_path, steps, sharding = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    info = init_distributed("cpu")
    rank, world = info.rank, info.world_size
    manifest = load_manifest(dataset)
    segments = resolve_split(dataset, manifest, [manifest.sources[0]["name"]])
    mcfg = ModelConfig(embedding_dim=16, dense_arch_layer_sizes=[32, 16],
                       over_arch_layer_sizes=[32, 16, 1])
    ocfg = OptimConfig(embedding_optimizer="sgd", embedding_lr=EMBEDDING_LR,
                       dense_optimizer="sgd", dense_lr=DENSE_LR)
    cards, features = manifest.cardinalities, manifest.features

    torch.manual_seed(0)
    reference = build_model(mcfg, features, cards, torch.device("cpu"),
                            sparse_device=torch.device("cpu"))
    initial = copy.deepcopy(reference.state_dict())

    model = build_model(mcfg, features, cards, torch.device("cpu"))
    apply_embedding_optimizer(model, ocfg)
    tables = [table_name(f) for f in SPARSE_NAMES]
    types = MIXED if sharding == "mixed" else [sharding]
    # min_partition 8 lets column-wise split the 16 columns over both ranks.
    constraints = {t: ParameterConstraints(sharding_types=[types[i % len(types)]], min_partition=8)
                   for i, t in enumerate(tables)}
    model, plan, _ = shard_model(model, tables, ShardingConfig(), info.device, BATCH,
                                 constraints)
    copy_into_sharded(model, initial)
    pipeline = TrainPipelineSparseDist(model, build_optimizer(model, ocfg), info.device)

    sharded_losses = []
    batches = iter(ParquetBatches(segments, BATCH, rank, world, features=features))
    for _ in range(steps):
        loss, _, _ = pipeline.progress(batches)
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        sharded_losses.append(loss.item() / world)
    final = gather_full(pipeline.detach())

    if rank == 0:
        loaders = [iter(ParquetBatches(segments, BATCH, r, world, features=features))
                   for r in range(world)]
        global_batches = [concat([next(it) for it in loaders]) for _ in range(steps)]
        result = {"sharded": sharded_losses, "plan": str(plan)}
        for name, emb_scale in (("reference", 1), ("summed_control", world)):
            ref = copy.deepcopy(reference)
            ref.load_state_dict(initial)
            emb = [p for n, p in ref.named_parameters() if "embedding_bags" in n]
            dense = [p for n, p in ref.named_parameters() if "embedding_bags" not in n]
            opt = torch.optim.SGD([{"params": emb, "lr": EMBEDDING_LR * emb_scale},
                                   {"params": dense, "lr": DENSE_LR}])
            losses = []
            for batch in global_batches:
                opt.zero_grad()
                loss, _ = ref(batch)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            ref_state = ref.state_dict()
            result[name] = {
                "losses": losses,
                "max_param_diff": max((final[k] - ref_state[k]).abs().max().item()
                                      for k in ref_state),
            }
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

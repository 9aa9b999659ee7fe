"""Builds torchrec's DLRM from the model config and the dataset's cardinalities."""

from __future__ import annotations

import functools

import torch
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain, InteractionArch
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.modules.mc_modules import (
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    ManagedCollisionCollection,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from dlrm.config import ModelConfig
from dlrm.schema.features import MANAGED_LIMIT, Features

# Managed tables admit the ids of every training batch (the module's eviction interval, in
# steps): an id seen once has a row from its next batch on, unless the table is full of
# more frequent (LFU) or more recent (LRU) ids.
EVICTION_INTERVAL = 1
_POLICIES = {"lfu": LFU_EvictionPolicy, "lru": LRU_EvictionPolicy}


def table_name(feature: str) -> str:
    """Embedding table of a feature (one table per categorical feature)."""
    return f"t_{feature}"


def check_tables_hold(features: Features, sizes: list[int], cardinalities: list[int],
                      where: str) -> None:
    """Raises ValueError, prefixed by ``where``, unless there is one table per categorical
    feature and every table holds every id of its feature in the dataset."""
    if len(sizes) != len(features.sparse):
        raise ValueError(f"{where}: {len(sizes)} tables for {len(features.sparse)} categorical "
                         f"features ({', '.join(features.sparse)})")
    for f, size, n in zip(features.sparse, sizes, cardinalities, strict=True):
        if size < n:
            raise ValueError(f"{where}: {f} has {size} rows but the dataset has {n} ids for it")


def table_sizes(cfg: ModelConfig, features: Features, cardinalities: list[int]) -> list[int]:
    """Rows of each table: ``model.num_embeddings_per_feature`` if set (it must hold every
    id of the dataset), else the dataset's cardinalities."""
    sizes = cfg.num_embeddings_per_feature
    if not sizes:
        return list(cardinalities)
    check_tables_hold(features, sizes, cardinalities, "model.num_embeddings_per_feature")
    return list(sizes)


@torch.fx.wrap  # a leaf for TrainPipelineSparseDist's tracer: it branches on key order
def stack_pooled(pooled: KeyedTensor, names: list[str], dim: int) -> torch.Tensor:
    """The pooled embeddings as [B, F, D] in the order of ``names``, as torchrec's
    ``SparseArch`` returns them: a view of the KeyedTensor's values where its keys are
    already in that order (an unsharded collection), else one copy that reorders them."""
    if pooled.keys() == names:
        return pooled.values().reshape(-1, len(names), dim)
    per_feature = pooled.to_dict()
    return torch.cat([per_feature[f] for f in names], dim=1).reshape(-1, len(names), dim)


@functools.lru_cache(maxsize=16)
def _pair_positions(keys: tuple[str, ...], names: tuple[str, ...], device: torch.device,
                    ) -> torch.Tensor:
    """Position (row * size + column), in the flattened Gram matrix of [dense, features in
    ``keys`` order], of every pair that torchrec's upper triangle over [dense, features in
    ``names`` order] holds, in its order. The matrix is symmetric, so (row, col) and (col,
    row) hold the same product."""
    at = [0] + [1 + keys.index(f) for f in names]  # position of canonical slot i
    i, j = torch.triu_indices(len(at), len(at), offset=1)
    at_t = torch.tensor(at)
    return (at_t[i] * len(at) + at_t[j]).to(device)


@torch.fx.wrap  # a leaf for TrainPipelineSparseDist's tracer: it reads the keys
def _dot_in_key_order(dense: torch.Tensor, pooled: KeyedTensor,
                      names: tuple[str, ...]) -> torch.Tensor:
    keys = tuple(pooled.keys())
    batch, dim = dense.shape
    combined = torch.cat((dense.unsqueeze(1), pooled.values().reshape(batch, len(keys), dim)),
                         dim=1)
    gram = torch.bmm(combined, combined.transpose(1, 2))
    pairs = _pair_positions(keys, names, dense.device)  # one gather: 5x faster on CPU than
    return torch.cat((dense, gram.reshape(batch, -1).index_select(1, pairs)), dim=1)  # [:, r, c]


class KeyOrderInteractionArch(InteractionArch):
    """torchrec's dot ``InteractionArch`` that also takes the pooled embeddings as the
    collection's KeyedTensor, in whatever key order it has.

    A sharded collection returns its features grouped by the rank that owns them, not in
    the model's order; torchrec's ``SparseArch`` reorders them with a copy of the batch's
    embeddings (and another in backward, 2 x 6.8 MB a step for the Criteo 1TB model at
    batch 512). Here the Gram matrix is taken in the keys' order and its pairs are read
    at the positions that give torchrec's output order, so nothing is copied; the
    products are the same numbers, in the same place. A [B, F, D] tensor still takes
    torchrec's own forward."""

    def __init__(self, num_sparse_features: int, names: list[str]) -> None:
        super().__init__(num_sparse_features)
        self.names = tuple(names)

    def forward(self, dense_features: torch.Tensor,
                sparse_features: torch.Tensor | KeyedTensor) -> torch.Tensor:
        if isinstance(sparse_features, torch.Tensor):
            return super().forward(dense_features, sparse_features)
        return _dot_in_key_order(dense_features, sparse_features, self.names)


class _LookupFirst:
    """torchrec ``DLRM.forward`` with the embedding lookup started before the dense arch.

    Sharded, the lookup returns an awaitable whose all-to-all runs while the dense arch
    computes; torchrec's order (dense arch, then lookup) waits for it at once. In backward
    the dense arch's nodes, created later, run first: while the embedding gradients'
    all-to-all is in flight. The dot interaction takes the collection's output as it is
    (``KeyOrderInteractionArch``). Same modules and parameter names as torchrec's classes,
    so checkpoints are unchanged."""

    def forward(self, dense_features: torch.Tensor,
                sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.sparse_arch.embedding_bag_collection(sparse_features)
        if isinstance(pooled, tuple):  # managed: (embeddings, remapped ids: none asked)
            pooled = pooled[0]
        embedded_dense = self.dense_arch(dense_features)
        if isinstance(self.inter_arch, KeyOrderInteractionArch):
            embedded_sparse = pooled
        else:
            embedded_sparse = stack_pooled(pooled, self.sparse_arch.sparse_feature_names,
                                           self.sparse_arch.D)
        return self.over_arch(self.inter_arch(dense_features=embedded_dense,
                                              sparse_features=embedded_sparse))


class LookupFirstDLRM(_LookupFirst, DLRM):
    """torchrec ``DLRM`` (dot interaction) with the lookup first."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.inter_arch = KeyOrderInteractionArch(self.sparse_arch.F,
                                                  self.sparse_arch.sparse_feature_names)


class LookupFirstDLRM_DCN(_LookupFirst, DLRM_DCN):
    """torchrec ``DLRM_DCN`` (DCN-v2 interaction) with the lookup first."""


class WholeBatchMCH(MCHManagedCollisionModule):
    """torchrec's zero-collision module, whose history of the ids to admit holds every id
    of every batch. torchrec sizes that buffer once, at 1.25 times the ids of the first
    batch a rank profiles, and silently drops the ids past it; a rank's share of a batch
    varies (ranks own ranges of values), so ids went uncounted, and differently in a run
    resumed at another batch. Here a batch that would not fit re-sizes it first (the
    buffer is empty between batches: ``EVICTION_INTERVAL`` is 1)."""

    def profile(self, features: dict) -> dict:
        if self.training and self._input_history_buffer_size != -1:
            ids = sum(f.values().numel() for f in features.values())
            if ids > self._input_history_buffer_size - self._current_history_buffer_offset:
                self._input_history_buffer_size = -1  # made anew for this batch's ids
        return super().profile(features)


def managed_tables(ebc: EmbeddingBagCollection, evictions: dict[str, str], buckets: int,
                   device: torch.device) -> ManagedCollisionEmbeddingBagCollection:
    """``ebc`` behind TorchRec's managed-collision modules (zero-collision hashing): each
    table's raw ids (``dlrm.rows.vocab.managed_ids``) are mapped to its rows, admitted and
    evicted in training by the feature's policy (``evictions``: feature → lfu / lru);
    an id without a row in evaluation shares its rank's reserved last row. ``buckets``
    must be a multiple of the world size (ranks own ranges of raw id values)."""
    configs = ebc.embedding_bag_configs()
    modules = {t.name: WholeBatchMCH(
        zch_size=t.num_embeddings, device=device,
        eviction_policy=_POLICIES[evictions[t.feature_names[0]]](),
        eviction_interval=EVICTION_INTERVAL, input_hash_size=MANAGED_LIMIT, buckets=buckets)
        for t in configs}
    collection = ManagedCollisionCollection(modules, embedding_configs=configs)
    return ManagedCollisionEmbeddingBagCollection(ebc, collection)


def build_model(cfg: ModelConfig, features: Features, cardinalities: list[int],
                dense_device: torch.device, sparse_device: torch.device | None = None,
                evictions: dict[str, str] | None = None, buckets: int = 1) -> DLRMTrain:
    """torchrec ``DLRM`` (dot interaction) or ``DLRM_DCN`` (DCN-v2 cross layers) wrapped in
    ``DLRMTrain`` (BCE loss on the logit; MSE on the output for a regression label).

    Args:
        cfg: the model section.
        features: the dataset's features: one table per categorical one, the dense arch
            takes the dense ones.
        cardinalities: rows of each table (one per categorical feature).
        dense_device: where the dense arch and over arch live.
        sparse_device: where the tables are created; ``meta`` (the default) defers
            their allocation to DistributedModelParallel, which places each shard.
        evictions: managed features (all of them): each one's eviction policy; the
            tables go behind managed-collision modules (:func:`managed_tables`) of
            ``buckets`` buckets.

    Returns:
        ``DLRMTrain``: ``forward(batch) -> (loss, (loss, logits [B], labels [B]))``.
    """
    if len(cardinalities) != len(features.sparse):
        raise ValueError(f"need {len(features.sparse)} cardinalities, got {len(cardinalities)}")
    data_type = DataType.FP16 if cfg.embedding_dtype == "fp16" else DataType.FP32
    tables = [
        EmbeddingBagConfig(name=table_name(f), embedding_dim=cfg.embedding_dim,
                           num_embeddings=n, feature_names=[f], data_type=data_type,
                           pooling=PoolingType[features.pooling_of(i).upper()])
        for i, (f, n) in enumerate(zip(features.sparse, cardinalities, strict=True))
    ]
    ebc = EmbeddingBagCollection(tables=tables, device=sparse_device or torch.device("meta"))
    common = {"embedding_bag_collection": ebc, "dense_in_features": len(features.dense),
              "dense_arch_layer_sizes": list(cfg.dense_arch_layer_sizes),
              "over_arch_layer_sizes": list(cfg.over_arch_layer_sizes),
              "dense_device": dense_device}
    if cfg.interaction == "dcn":
        model = LookupFirstDLRM_DCN(**common, dcn_num_layers=cfg.dcn_num_layers,
                                    dcn_low_rank_dim=cfg.dcn_low_rank_dim)
    else:
        model = LookupFirstDLRM(**common)
    if evictions:  # torchrec's arch reads the plain collection's configs; then it goes behind
        model.sparse_arch.embedding_bag_collection = managed_tables(
            ebc, evictions, buckets, sparse_device or torch.device("meta"))
    train = DLRMTrain(model)
    if features.label_kind == "regression":  # the output is the number itself
        train.loss_fn = torch.nn.MSELoss()
    return train


def autocast_dense(model: DLRMTrain, device: torch.device) -> None:
    """Runs the dense arch, interaction and over arch under bf16 autocast (their outputs
    back in fp32); the tables and their all-to-all are untouched. Parameter names do not
    change, so checkpoints stay interchangeable with fp32 runs."""
    for module in (model.model.dense_arch, model.model.inter_arch, model.model.over_arch):
        forward = module.forward

        @functools.wraps(forward)
        def cast(*args, _forward=forward, **kwargs):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return _forward(*args, **kwargs).float()

        module.forward = cast

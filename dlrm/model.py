"""Builds torchrec's DLRM from the model config and the dataset's cardinalities."""

from __future__ import annotations

import torch
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from dlrm.config import ModelConfig
from dlrm.data.schema import NUM_DENSE, SPARSE_NAMES


def table_name(feature: str) -> str:
    """Embedding table of a feature (one table per Criteo categorical feature)."""
    return f"t_{feature}"


def build_model(cfg: ModelConfig, cardinalities: list[int], dense_device: torch.device,
                sparse_device: torch.device | None = None) -> DLRMTrain:
    """torchrec ``DLRM`` (dot interaction) wrapped in ``DLRMTrain`` (BCE loss).

    Args:
        cfg: the model section.
        cardinalities: rows of each table, from the dataset manifest (26 ints).
        dense_device: where the dense arch and over arch live.
        sparse_device: where the tables are created; ``meta`` (the default) defers
            their allocation to DistributedModelParallel, which places each shard.

    Returns:
        ``DLRMTrain``: ``forward(batch) -> (loss, (loss, logits [B], labels [B]))``.
    """
    if len(cardinalities) != len(SPARSE_NAMES):
        raise ValueError(f"need {len(SPARSE_NAMES)} cardinalities, got {len(cardinalities)}")
    tables = [
        EmbeddingBagConfig(name=table_name(f), embedding_dim=cfg.embedding_dim,
                           num_embeddings=n, feature_names=[f])
        for f, n in zip(SPARSE_NAMES, cardinalities, strict=True)
    ]
    ebc = EmbeddingBagCollection(tables=tables, device=sparse_device or torch.device("meta"))
    return DLRMTrain(DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=NUM_DENSE,
        dense_arch_layer_sizes=list(cfg.dense_arch_layer_sizes),
        over_arch_layer_sizes=list(cfg.over_arch_layer_sizes),
        dense_device=dense_device,
    ))

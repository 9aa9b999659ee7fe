"""The checks of a config against its dataset and this host, made before any process group
starts, for every command that reads a dataset with a model: ``dlrm train``
(:func:`preflight`), ``dlrm plan`` (:func:`plan_inputs`), and ``dlrm evaluate``, ``dlrm
score`` and ``dlrm export`` of a checkpoint (:func:`checkpoint_inputs`, :func:`run_config`).
Each config section checks its own values itself (``dlrm.config.sections``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlrm.config import Config, load_config
from dlrm.data.split_checks import check_data, check_vocab_rows, split_specs
from dlrm.errors import CheckpointError, ConfigError
from dlrm.metrics import HEADLINE
from dlrm.rows.like import VOCAB, check_label_kind, check_same_encoding, file_sha256
from dlrm.schema.declared import load_schema
from dlrm.schema.features import Features
from dlrm.schema.manifest import MANIFEST, Manifest, load_manifest
from dlrm.schema.splits import ALL, row_ranges
from dlrm.train.checkpoint import read_marker
from dlrm.train.dist import resolve_device
from dlrm.train.model import check_tables_hold, table_sizes
from dlrm.train.optim import CPU_EMBEDDING_OPTIMIZERS


def check_features(config: Config, features: Features) -> None:
    """Checks the keys that name or count the dataset's categorical features (known once
    its manifest is read) against them.

    Raises:
        ConfigError: naming the key.
    """
    names, n = features.sparse, len(features.sparse)
    for key, value in [("data.multi_hot_sizes", config.data.multi_hot_sizes),
                       ("model.num_embeddings_per_feature",
                        config.model.num_embeddings_per_feature)]:
        if value and len(value) != n:
            raise ConfigError(f"{key}: must have one entry per categorical feature of the "
                              f"dataset ({n}: {', '.join(names)}), got {len(value)}")
    for key, named in [("sharding.table_sharding_types", config.sharding.table_sharding_types),
                       ("data.oov_dropout", config.data.oov_dropout)]:
        for f in named:
            if f not in names:
                raise ConfigError(f"{key}.{f}: unknown feature, the dataset's are "
                                  f"{', '.join(names)}")
    t, kind = config.train, features.label_kind
    fits = ("auto", *HEADLINE[kind])
    for key, bad in [("train.best_metric", t.best_metric not in fits),
                     ("train.target_auc", bool(t.target_auc) and kind != "binary"),
                     ("train.target_rmse", bool(t.target_rmse) and kind != "regression")]:
        if bad:
            raise ConfigError(f"{key}: the dataset's label is a {kind} one, whose "
                              f"validation metrics are {', '.join(fits[1:])}")


def preflight(config: Config) -> Manifest:
    """Everything that can be wrong before any process group starts; returns the manifest.

    Raises:
        ValueError: naming the key, path or source at fault.
    """
    manifest = check_data(config.data)
    features = manifest.features
    check_features(config, features)
    sizes = table_sizes(config.model, features, manifest.cardinalities)
    check_device(config)
    if config.train.init_from:
        check_init_from(Path(config.train.init_from), config.data.path, manifest, sizes)
    if manifest.managed:
        check_managed(config)
    return manifest


def check_managed(config: Config) -> None:
    """Settings managed tables cannot train with (on this stack)."""
    if config.data.multi_hot_sizes:
        raise ValueError("data.multi_hot_sizes: the dataset's features are managed (raw ids, "
                         "mapped to rows in the model): nothing to expand synthetically")
    if (resolve_device(config.train.device) == "cpu"
            and config.optim.embedding_optimizer == "rowwise_adagrad"):
        raise ValueError("optim.embedding_optimizer: rowwise_adagrad cannot train managed "
                         "tables on CPU: fbgemm-gpu-cpu has no kernel to reset an evicted "
                         "row's momentum (fbgemm::reset_weight_momentum); use adagrad or sgd")


def check_init_from(checkpoint: Path, data: str, manifest: Manifest,
                    sizes: list[int]) -> None:
    """A checkpoint a new run may start from (``train.init_from``): complete, of a run
    whose training data gave its ids the meaning this run's have (the same dataset, or
    one preprocessed ``--like`` it) with tables of this run's sizes, or whose vocabularies
    this run's dataset grew (``--like`` one of them ``--grow``: its tables grow, none
    shrinks); and of this run's label kind.

    Raises:
        ValueError: naming the checkpoint and what differs.
    """
    where = f"train.init_from: {checkpoint}"
    try:
        position = read_marker(checkpoint)["position"]
    except CheckpointError as e:
        raise ValueError(f"train.init_from: {e}") from None
    check_managed_world(manifest, position, where)
    trained_on, old = run_config(checkpoint).data.path, list(position["table_sizes"])
    vocab = Path(trained_on) / VOCAB
    if manifest.lineage and vocab.is_file() and file_sha256(vocab) in manifest.lineage:
        check_label_kind(trained_on, manifest, f"data.path {data}", position.get("label_kind"))
        smaller = [f"{name} ({was} > {now})" for name, was, now in zip(
            manifest.features.sparse, old, sizes, strict=True) if now < was]
        if smaller:
            raise ValueError(f"{where}: {data} grew the vocabularies of its run's {trained_on}, "
                             f"but this run's tables are smaller: {', '.join(smaller)} "
                             "(model.num_embeddings_per_feature?)")
        return
    check_same_encoding(trained_on, manifest, f"data.path {data}", position.get("label_kind"))
    same = Path(trained_on).resolve() == Path(data).resolve()
    if not same and manifest.like is None and vocab.is_file():
        raise ValueError(f"{where}: its run trained on {trained_on}, whose vocabularies "
                         f"gave its ids their meaning; {data} has vocabularies of its own "
                         f"(preprocess the new files --like {trained_on}, with --grow to "
                         "give new values ids of their own)")
    if old != list(sizes):
        raise ValueError(f"{where}: its tables hold {old} rows, this "
                         f"run's {sizes} (the same dataset or one --like it, and the same "
                         "model.num_embeddings_per_feature, give the same tables)")


def check_managed_world(manifest: Manifest, position: dict[str, Any], where: str,
                        world: int | None = None) -> None:
    """Managed tables load on as many ranks as wrote them: each rank's collision module
    owns a range of raw id values and maps them to its rows (an id without a row goes to
    its rank's reserved row), which another world size would cut otherwise. ValueError.
    ``world``: this job's world size (default: torchrun's ``WORLD_SIZE``, else 1)."""
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    if manifest.managed and position["world_size"] != world:
        raise ValueError(f"{where}: written by {position['world_size']} ranks; its managed "
                         "tables map raw ids to rows per rank (each rank owns a range of "
                         f"values), so it loads on {position['world_size']} ranks only, not "
                         f"{world}")


def check_device(config: Config) -> None:
    """Settings the device of this host cannot run."""
    device = resolve_device(config.train.device)
    if device == "cpu" and config.optim.embedding_optimizer not in CPU_EMBEDDING_OPTIMIZERS:
        raise ValueError(f"optim.embedding_optimizer: {config.optim.embedding_optimizer!r} has "
                         "no CPU kernel in fbgemm-gpu-cpu (it has "
                         f"{', '.join(CPU_EMBEDDING_OPTIMIZERS)}); it runs on GPU")
    if device == "cpu" and config.optim.embedding_weight_decay:
        raise ValueError("optim.embedding_weight_decay: fbgemm-gpu-cpu's fused kernels ignore "
                         "weight decay (an update with it equals one without); it runs on "
                         "GPU. On CPU, regularize with data.oov_dropout or fewer epochs "
                         "(train.early_stopping)")
    if device == "cpu" and config.train.autocast != "none":
        raise ValueError(f"train.autocast: {config.train.autocast} autocast is for GPUs; "
                         "this run is on CPU")


def plan_inputs(config: Config) -> tuple[Features, list[int], dict[str, str]]:
    """The features, table sizes and (managed features) eviction policies ``dlrm plan``
    shards: the dataset's where it exists; a recipe that sizes every table itself
    (``model.num_embeddings_per_feature``) plans Criteo's layout without one."""
    sizes, features, evictions = config.model.num_embeddings_per_feature, None, {}
    if not sizes or (Path(config.data.path) / MANIFEST).is_file():
        manifest = check_data(config.data)
        features, evictions = manifest.features, manifest.evictions
        sizes = sizes or manifest.cardinalities
    features = features or load_schema("criteo").features()
    check_features(config, features)  # also one size per feature
    return features, list(sizes), evictions


def run_config(checkpoint: Path) -> Config:
    """The config of the run that wrote ``checkpoint`` (``RUN/checkpoints/step-N``), as
    the run wrote it."""
    path = checkpoint.parent.parent / "config.toml"
    if not path.is_file():
        raise ValueError(f"{path}: not found; a checkpoint is read with the config.toml of "
                         "its run directory (RUN/checkpoints/step-N → RUN/config.toml)")
    return load_config(path)


@dataclass(frozen=True)
class CheckpointInputs:
    """What scoring a checkpoint on a dataset split reads, checked together."""

    config: Config  # the run's, as it wrote it (its data.path: the training dataset)
    position: dict[str, Any]  # the checkpoint marker's: step, table sizes, label kind
    manifest: Manifest  # of the dataset scored
    specs: list[str]  # the split's sources in it

    @property
    def sizes(self) -> list[int]:
        return self.position["table_sizes"]


def split_specs_for(config: Config, manifest: Manifest, split: str) -> list[str]:
    """The sources of ``split`` in the dataset: the run's choice (or the default
    convention), or every row for ``all``."""
    if split == "all":
        return [ALL]
    return split_specs(config.data, manifest)[split]


def checkpoint_inputs(checkpoint: Path, data: str | Path, split: str) -> CheckpointInputs:
    """The run, the checkpoint and the dataset of scoring ``split`` of ``data``, checked:
    the checkpoint complete, the dataset encoded as the training data was, every id within
    the tables, and a val or test split none of whose rows the vocabularies counted.

    Raises:
        CheckpointError, ValueError, PreprocessError: naming the file, key or rows.
    """
    position = read_marker(checkpoint)["position"]  # CheckpointError if absent
    config = run_config(checkpoint)
    manifest = load_manifest(data)
    check_managed_world(manifest, position, f"{checkpoint}")
    check_same_encoding(config.data.path, manifest, str(data), position.get("label_kind"))
    check_tables_hold(manifest.features, position["table_sizes"], manifest.cardinalities,
                      f"{data} against the tables of {checkpoint}")
    specs = split_specs_for(config, manifest, split)
    if split in ("val", "test"):  # its rows must not have been counted as training's
        check_vocab_rows(manifest, {split: row_ranges(manifest, specs)}, str(data), (split,))
    return CheckpointInputs(config, position, manifest, specs)

"""The config's sections: one dataclass each, every field with a one-line doc (the string
literal under it, from which docs/config.md is generated) and a production default (the
defaults are torchrec_dlrm's published Criteo 1TB setting), and each section checking its
own values (``validate``); ``Config.validate`` adds the checks across sections. The checks
that need the dataset are the preflight's (``dlrm.train.preflight``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from dlrm.errors import ConfigError

EMBEDDING_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "adam", "sgd")
DENSE_OPTIMIZERS = ("adagrad", "adam", "sgd")
INTERACTIONS = ("dot", "dcn")
PRECISIONS = ("fp32", "fp16", "bf16")
# The kernels that train with the fused embedding optimizer (dense / quant do not).
COMPUTE_KERNELS = ("fused", "fused_uvm", "fused_uvm_caching")
SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise")
DEVICES = ("auto", "cpu", "cuda")
BEST_METRICS = ("auto", "auc", "logloss", "rmse", "mae")


def need(ok: bool, key: str, msg: str) -> None:
    """Raises ConfigError ``key: msg`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {msg}")


@dataclass
class DataConfig:
    path: str = ""
    """Preprocessed dataset directory (holds manifest.json)."""
    batch_size: int = 2048
    """Training batch size per rank."""
    train_sources: list[str] | None = None
    """Training sources (manifest names, or `name[a:b]` row fractions); absent: all but the
    last (torchrec_dlrm convention)."""
    val_sources: list[str] | str | None = None
    """Validation sources; absent: first half of the last source (torchrec_dlrm
    convention); "none": no validation."""
    test_sources: list[str] | str | None = None
    """Test sources; absent: second half of the last source (torchrec_dlrm convention);
    "none": no test."""
    allow_overlap: bool = False
    """Let two of train, val and test share rows (a deliberate overlap; otherwise an error)."""
    oov_dropout: dict[str, float] = field(default_factory=dict)
    """Per vocab feature, the share of training rows whose id is replaced by the
    out-of-vocabulary id, e.g. {user_id = 0.1}, so that the OOV row trains for values
    first seen after training; empty: none."""
    shuffle_buffer: int = 0
    """Training rows shuffled through a seeded buffer (row group order too); 0: in order."""
    shuffle_seed: int = 0
    """Seed of the training shuffle; each epoch and rank draws its own order from it."""
    prefetch: int = 4
    """Batches each loader makes ahead in a background thread; 0: made on demand, no thread."""
    multi_hot_sizes: list[int] = field(default_factory=list)
    """Ids per bag of each categorical feature: MLPerf DLRMv2 synthetic multi-hot; empty: off."""
    multi_hot_seed: int = 0
    """Seed of the multi-hot lookup tables; 0: the MLPerf DLRMv2 reference's tables."""

    def validate(self) -> None:
        need(bool(self.path), "data.path", "is required (a dataset written by `dlrm preprocess`)")
        need(self.batch_size > 0, "data.batch_size", f"must be positive, got {self.batch_size}")
        for key in ("shuffle_buffer", "shuffle_seed", "prefetch"):
            need(getattr(self, key) >= 0, f"data.{key}", f"must be >= 0, got {getattr(self, key)}")
        need(not self.multi_hot_sizes or min(self.multi_hot_sizes) > 0, "data.multi_hot_sizes",
             f"must be empty or positive ints, got {self.multi_hot_sizes}")
        need(0 <= self.multi_hot_seed < 2**32, "data.multi_hot_seed",
             f"must be in [0, 2**32), got {self.multi_hot_seed}")
        for split in ("train", "val", "test"):
            key, specs = f"data.{split}_sources", getattr(self, f"{split}_sources")
            need(specs != [], key, 'an empty list names no rows: leave the key out for the '
                 'default split' + ('' if split == "train" else ', or say "none" for no ' + split))
            need(not isinstance(specs, str) or (specs == "none" and split != "train"), key,
                 f'expected a list of sources{"" if split == "train" else " or none"}, '
                 f'got {specs!r}')
        for f, p in self.oov_dropout.items():
            need(0 <= p < 1, f"data.oov_dropout.{f}", f"must be in [0, 1), got {p}")


@dataclass
class ModelConfig:
    embedding_dim: int = 128
    """Embedding dimension of every table (also the dense arch's output width)."""
    dense_arch_layer_sizes: list[int] = field(default_factory=lambda: [512, 256, 128])
    """Bottom MLP widths; the last must equal embedding_dim."""
    over_arch_layer_sizes: list[int] = field(default_factory=lambda: [1024, 1024, 512, 256, 1])
    """Top MLP widths; the last must be 1 (the click logit)."""
    num_embeddings_per_feature: list[int] = field(default_factory=list)
    """Rows of each feature's table (e.g. Criteo 1TB capped at 40M); empty: the dataset's
    cardinalities. Each must hold the dataset's ids (>= its cardinality)."""
    interaction: str = "dot"
    """Feature interaction: dot (torchrec DLRM) or dcn (DCN-v2 cross layers, DLRM_DCN)."""
    dcn_num_layers: int = 3
    """dcn: cross layers."""
    dcn_low_rank_dim: int = 512
    """dcn: rank of each cross layer's low-rank weight."""
    embedding_dtype: str = "fp32"
    """Storage of the embedding tables: fp32 or fp16 (half the memory; fp32 math)."""

    def validate(self) -> None:
        need(self.embedding_dim > 0, "model.embedding_dim",
             f"must be positive, got {self.embedding_dim}")
        need(bool(self.dense_arch_layer_sizes)
             and self.dense_arch_layer_sizes[-1] == self.embedding_dim,
             "model.dense_arch_layer_sizes", f"must end with model.embedding_dim="
             f"{self.embedding_dim}, got {self.dense_arch_layer_sizes}")
        need(bool(self.over_arch_layer_sizes) and self.over_arch_layer_sizes[-1] == 1,
             "model.over_arch_layer_sizes", f"must end with 1, got {self.over_arch_layer_sizes}")
        need(not self.num_embeddings_per_feature or min(self.num_embeddings_per_feature) > 0,
             "model.num_embeddings_per_feature",
             f"must be empty or positive ints, got {self.num_embeddings_per_feature}")
        need(self.interaction in INTERACTIONS, "model.interaction",
             f"must be one of {INTERACTIONS}, got {self.interaction!r}")
        for key in ("dcn_num_layers", "dcn_low_rank_dim"):
            need(getattr(self, key) > 0, f"model.{key}",
                 f"must be positive, got {getattr(self, key)}")
        need(self.embedding_dtype in ("fp32", "fp16"), "model.embedding_dtype",
             f"must be fp32 or fp16, got {self.embedding_dtype!r}")


@dataclass
class ShardingConfig:
    sharding_types: list[str] = field(default_factory=list)
    """Sharding types the planner may use (table_wise, column_wise, table_column_wise, and on
    GPU row_wise, table_row_wise); empty: all of these."""
    table_sharding_types: dict[str, list[str]] = field(default_factory=dict)
    """Per-feature override of sharding_types, e.g. {C20 = ["row_wise"]}."""
    compute_kernels: list[str] = field(default_factory=list)
    """Compute kernels the planner may use for every table: fused (in device memory),
    fused_uvm (in host memory), fused_uvm_caching (host memory, a cache in HBM); GPU only
    but fused. Empty: the planner's choice."""
    column_shard_dim: int = 0
    """Smallest width of a column-wise shard (torchrec's min_partition); 0: torchrec's (128)."""
    hbm_gib: float = 0.0
    """Device (GPU) memory per rank the planner may fill; 0: the device's own size."""
    ddr_gib: float = 0.0
    """Host memory per rank the planner may fill; 0: this host's memory / ranks per host."""
    a2a_forward_precision: str = "fp32"
    """Embedding all-to-all codec, forward: fp32 (none), fp16 or bf16."""
    a2a_backward_precision: str = "fp32"
    """Embedding all-to-all codec, backward: fp32 (none), fp16 or bf16."""
    allreduce_precision: str = "fp32"
    """Dense gradient all-reduce (DDP comm hook): fp32 (none), fp16 or bf16."""

    def validate(self) -> None:
        for key, kinds in [("sharding.sharding_types", self.sharding_types),
                           *((f"sharding.table_sharding_types.{f}", v)
                             for f, v in self.table_sharding_types.items())]:
            for st in kinds:
                need(st != "data_parallel", key,
                     "data_parallel is not offered: torchrec trains a data-parallel table with "
                     "the dense optimizer, not the embedding optimizer")
                need(st in SHARDING_TYPES, key,
                     f"unknown type {st!r}, expected some of {SHARDING_TYPES}")
        for kernel in self.compute_kernels:
            need(kernel in COMPUTE_KERNELS, "sharding.compute_kernels",
                 f"unknown kernel {kernel!r}, expected some of {COMPUTE_KERNELS}")
        for key in ("column_shard_dim", "hbm_gib", "ddr_gib"):
            need(getattr(self, key) >= 0, f"sharding.{key}",
                 f"must be >= 0, got {getattr(self, key)}")
        for key in ("a2a_forward_precision", "a2a_backward_precision", "allreduce_precision"):
            need(getattr(self, key) in PRECISIONS, f"sharding.{key}",
                 f"must be one of {PRECISIONS}, got {getattr(self, key)!r}")


@dataclass
class OptimConfig:
    embedding_optimizer: str = "rowwise_adagrad"
    """Fused embedding optimizer applied in backward: rowwise_adagrad, adagrad (exact), adam,
    sgd."""
    embedding_lr: float = 0.006
    """Learning rate of the embedding optimizer."""
    dense_optimizer: str = "adagrad"
    """Optimizer of the dense (DDP) part: adagrad, adam, sgd."""
    dense_lr: float = 0.006
    """Learning rate of the dense optimizer."""
    eps: float = 1e-8
    """Epsilon of the Adagrad and Adam optimizers."""
    warmup_steps: int = 0
    """LR schedule (MLPerf): linear warmup from 0 over this many steps; 0: none."""
    decay_start: int = 0
    """LR schedule: step where polynomial decay starts (constant LR before it)."""
    decay_steps: int = 0
    """LR schedule: steps of polynomial decay to 0 (then held); 0: no decay."""
    decay_power: float = 2.0
    """LR schedule: power of the polynomial decay (MLPerf: 2)."""
    weight_decay: float = 0.0
    """L2 penalty of the dense optimizer (added to the gradient, as torch's optimizers do)."""
    embedding_weight_decay: float = 0.0
    """L2 penalty on the embedding rows a batch touches, applied by fbgemm's fused GPU
    kernels of rowwise_adagrad (L2 mode) and adam; exact adagrad and sgd have none, and
    fbgemm-gpu-cpu's kernels ignore it (measured), so it is refused on CPU."""

    def validate(self) -> None:
        need(self.embedding_optimizer in EMBEDDING_OPTIMIZERS, "optim.embedding_optimizer",
             f"must be one of {EMBEDDING_OPTIMIZERS}, got {self.embedding_optimizer!r}")
        need(self.dense_optimizer in DENSE_OPTIMIZERS, "optim.dense_optimizer",
             f"must be one of {DENSE_OPTIMIZERS}, got {self.dense_optimizer!r}")
        for key in ("warmup_steps", "decay_start", "decay_steps"):
            need(getattr(self, key) >= 0, f"optim.{key}", f"must be >= 0, got {getattr(self, key)}")
        need(not self.decay_steps or self.decay_start >= self.warmup_steps, "optim.decay_start",
             f"must be >= optim.warmup_steps={self.warmup_steps}, got {self.decay_start}")
        need(self.decay_power > 0, "optim.decay_power", f"must be positive, got {self.decay_power}")
        for key in ("weight_decay", "embedding_weight_decay"):
            need(getattr(self, key) >= 0, f"optim.{key}", f"must be >= 0, got {getattr(self, key)}")
        need(not self.embedding_weight_decay
             or self.embedding_optimizer in ("rowwise_adagrad", "adam"),
             "optim.embedding_weight_decay", f"fbgemm's fused {self.embedding_optimizer} has no "
             "weight decay; rowwise_adagrad and adam have (on GPU)")


@dataclass
class TrainConfig:
    epochs: int = 1
    """Passes over the training sources."""
    limit_train_batches: int = 0
    """Stop each epoch after this many steps; 0: no limit."""
    seed: int = 0
    """Seed of model initialisation."""
    log_every: int = 100
    """Steps between training log lines (loss, global samples/s)."""
    tensorboard: bool = False
    """Also write every metric (and the plan's memory per rank) as TensorBoard event
    files in RUN/tb/ (`tensorboard --logdir RUN/tb`)."""
    eval_every: int = 0
    """Steps between validation runs within an epoch; 0: only at the end."""
    device: str = "auto"
    """cpu, cuda or auto (cuda when available); the backend follows: gloo / nccl."""
    target_auc: float = 0.0
    """Stop once a validation AUC reaches this (MLPerf: 0.80275); 0: run every epoch."""
    target_rmse: float = 0.0
    """Regression label: stop once a validation RMSE falls to this; 0: run every epoch."""
    best_metric: str = "auto"
    """The validation metric early_stopping and keep_best follow: auc (higher is better),
    logloss, rmse or mae (lower); auto: auc for a binary label, rmse for a regression."""
    early_stopping: int = 0
    """Stop after this many validations in a row without a better best_metric (patience);
    validation runs at every epoch's end and every eval_every steps. 0: off."""
    keep_best: bool = False
    """Keep the checkpoint of the best validation as RUN/checkpoints/best; the final val and
    test metrics are then the best checkpoint's."""
    autocast: str = "none"
    """Mixed precision of the dense part: none or bf16 (GPU only; tables are unaffected)."""
    checkpoint_every: int = 0
    """Steps between checkpoints (also written at the end and on SIGTERM); 0: only those."""
    keep_checkpoints: int = 3
    """Complete checkpoints kept in RUN/checkpoints, newest first; 0: all."""
    collective_timeout_s: int = 1800
    """Timeout of every collective (NCCL's watchdog aborts the job past it; torch's default
    is 600): it must cover the longest work one rank does while others wait, such as
    checksumming its share of a checkpoint on shared storage."""
    resume: str = "auto"
    """auto: go on from the newest complete checkpoint of the run directory, if any;
    none: start afresh; or the path of a checkpoint to start from."""
    init_from: str = ""
    """A checkpoint of another run to start this new run from (warm start, e.g. on the
    next day's log): its tables, dense part and optimizer state; this run counts its own
    steps, epochs and LR schedule from 0. A checkpoint of this run's own directory (a
    resume) comes first. Empty: start from the seed's initialisation."""
    init_from_weights_only: bool = False
    """With init_from: take its tables and dense part only; the optimizer starts fresh."""

    def validate(self) -> None:
        need(0 <= self.target_auc < 1, "train.target_auc",
             f"must be in [0, 1), got {self.target_auc}")
        need(self.target_rmse >= 0, "train.target_rmse", f"must be >= 0, got {self.target_rmse}")
        need(self.best_metric in BEST_METRICS, "train.best_metric",
             f"must be one of {BEST_METRICS}, got {self.best_metric!r}")
        need(self.early_stopping >= 0, "train.early_stopping",
             f"must be >= 0 (validations without improvement), got {self.early_stopping}")
        need(self.autocast in ("none", "bf16"), "train.autocast",
             f"must be none or bf16, got {self.autocast!r}")
        need(self.epochs > 0, "train.epochs", f"must be positive, got {self.epochs}")
        need(self.device in DEVICES, "train.device",
             f"must be one of {DEVICES}, got {self.device!r}")
        for key in ("limit_train_batches", "eval_every", "checkpoint_every", "keep_checkpoints"):
            need(getattr(self, key) >= 0, f"train.{key}", f"must be >= 0, got {getattr(self, key)}")
        need(self.init_from or not self.init_from_weights_only, "train.init_from_weights_only",
             "needs train.init_from (the checkpoint whose weights to take)")
        for key in ("log_every", "collective_timeout_s"):
            need(getattr(self, key) > 0, f"train.{key}",
                 f"must be positive, got {getattr(self, key)}")


@dataclass
class EvalConfig:
    batch_size: int = 0
    """Evaluation batch size per rank; 0: data.batch_size."""
    limit_batches: int = 0
    """Evaluate at most this many batches per rank; 0: the whole split."""
    limit_val_batches: int = 0
    """As limit_batches, for val only (overrides it); 0: limit_batches."""
    limit_test_batches: int = 0
    """As limit_batches, for test only (overrides it); 0: limit_batches."""

    def validate(self) -> None:
        for key in ("batch_size", "limit_batches", "limit_val_batches", "limit_test_batches"):
            need(getattr(self, key) >= 0, f"eval.{key}", f"must be >= 0, got {getattr(self, key)}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        """Each section's own checks, then those across sections.

        Raises:
            ConfigError: naming the key, for values each well typed but wrong or
                inconsistent.
        """
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        t = self.train
        for key, on in [("train.early_stopping", t.early_stopping),
                        ("train.keep_best", t.keep_best), ("train.target_auc", t.target_auc),
                        ("train.target_rmse", t.target_rmse), ("train.eval_every", t.eval_every)]:
            need(not (on and self.data.val_sources == "none"), key,
                 'needs validation rows, but data.val_sources = "none"')

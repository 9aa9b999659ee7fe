"""The configuration: its sections (``sections``: one dataclass each, validating itself)
and how a recipe is read and written (``load``). Only the trainer holds the whole
:class:`Config`; each component is built from its own section."""

from dlrm.config.load import load_config, to_toml, toml_value
from dlrm.config.sections import (
    BEST_METRICS,
    COMPUTE_KERNELS,
    DENSE_OPTIMIZERS,
    DEVICES,
    EMBEDDING_OPTIMIZERS,
    INTERACTIONS,
    PRECISIONS,
    SHARDING_TYPES,
    Config,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    ShardingConfig,
    TrainConfig,
)

__all__ = ["BEST_METRICS", "COMPUTE_KERNELS", "DENSE_OPTIMIZERS", "DEVICES",
           "EMBEDDING_OPTIMIZERS", "INTERACTIONS", "PRECISIONS", "SHARDING_TYPES", "Config",
           "DataConfig", "EvalConfig", "ModelConfig", "OptimConfig", "ShardingConfig",
           "TrainConfig", "load_config", "to_toml", "toml_value"]

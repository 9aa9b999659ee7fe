"""The checks of a config against its dataset and this host, made before any process group
starts (each config section checks its own values itself: ``dlrm.config.sections``)."""

from __future__ import annotations

from dlrm.config import Config
from dlrm.errors import ConfigError
from dlrm.metrics import HEADLINE
from dlrm.schema.features import Features


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

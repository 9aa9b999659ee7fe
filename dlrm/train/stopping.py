"""Knowing when to stop: the best validation so far of the metric a run follows
(``train.best_metric``), for early stopping and ``train.keep_best``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dlrm.config import TrainConfig
from dlrm.metrics import HEADLINE

BEST = "best"  # RUN/checkpoints/best: train.keep_best's checkpoint


def best_metric(cfg: TrainConfig, kind: str) -> str:
    """The validation metric train.best_metric names (auto: the label kind's first)."""
    return HEADLINE[kind][0] if cfg.best_metric == "auto" else cfg.best_metric


@dataclass
class Best:
    """The best validation so far of a metric (AUC higher is better, the rest lower), and
    the validations since it."""

    metric: str
    value: float | None = None
    step: int | None = None
    stale: int = 0

    def update(self, value: float, step: int) -> bool:
        """Takes a validation's value; True if it is the best yet."""
        better = self.value is None or (value > self.value if self.metric == "auc"
                                        else value < self.value)
        if better:
            self.value, self.step, self.stale = float(value), step, 0
        else:
            self.stale += 1
        return better

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.value, "step": self.step,
                "stale": self.stale}

    @classmethod
    def from_json(cls, metric: str, record: dict[str, Any]) -> Best:
        if record.get("metric") != metric:  # the run now follows another metric
            return cls(metric)
        return cls(metric, record["value"], record["step"], record["stale"])

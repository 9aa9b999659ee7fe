"""How a server batches its requests (``dlrm serve --max-batch-rows ...``); no heavy
imports, so that the command line reads its defaults from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    """How requests are batched (``dlrm serve --max-batch-rows ...``)."""

    max_batch_rows: int = 1024  # 256-row requests at 16 connections: 45k rows/s, against
    # 39k with 4096 (all 16 in one batch: none parsed while it is scored) and 30k with 512
    max_wait_ms: float = 0.0  # 0: a batch is whatever waits when the last one is scored
    max_queue: int = 1024  # requests waiting to be scored
    timeout_s: float = 30.0  # from arrival to answer

    def __post_init__(self) -> None:
        for key in ("max_batch_rows", "max_queue"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be at least 1, got "
                                 f"{getattr(self, key)}")
        for key in ("max_wait_ms", "timeout_s"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"--{key.replace('_', '-')} must be >= 0, got "
                                 f"{getattr(self, key)}")


DEFAULT_POLICY = Policy()

"""Run output: metrics.jsonl (and TensorBoard event files under ``RUN/tb/`` when asked)
and one structured line per event, from rank 0 only."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6)
    return value


class RunLog:
    """Appends ``{"step": ..., name: figure}`` lines to ``metrics.jsonl`` and prints events.

    Ranks other than 0 get an inert instance, so callers never test the rank. On a
    terminal training shows a tqdm bar and events print above it; otherwise each event
    is one JSON line on stdout.
    """

    def __init__(self, run_dir: Path | None, enabled: bool, append: bool = False) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.metrics = None
        self.board: Any = None
        self.bar: tqdm | None = None
        if enabled and run_dir is not None:  # a resumed run appends to its metrics
            self.metrics = open(run_dir / "metrics.jsonl", "a" if append else "w",
                                encoding="utf-8")

    def tensorboard(self, step: int) -> None:
        """Also writes every metric to TensorBoard event files in ``RUN/tb/``; a run
        resumed at ``step`` hides what an earlier try logged after that step (what it
        logged at the step itself, before saving the checkpoint, is the resumed run's past
        and is not logged again)."""
        if self.metrics is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(self.run_dir / "tb"),
                                       purge_step=step + 1 if step else None)

    def progress(self, total: int, desc: str) -> None:
        """A progress bar over ``total`` steps, on a terminal only."""
        self.close_progress()
        if self.enabled and sys.stdout.isatty():
            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)

    def advance(self, n: int = 1, **postfix: float) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close_progress(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def event(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        line = json.dumps({"event": event, **{k: _clean(v) for k, v in fields.items()}})
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def metric(self, step: int, **figures: float) -> None:
        if self.metrics is not None:
            record = {"step": step, **{k: _clean(v) for k, v in figures.items()}}
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        if self.board is not None:
            for key, value in figures.items():
                if isinstance(value, int | float) and not math.isnan(value):
                    self.board.add_scalar(key, value, step)
            self.board.flush()

    def close(self) -> None:
        self.close_progress()
        if self.metrics is not None:
            self.metrics.close()
        if self.board is not None:
            self.board.close()

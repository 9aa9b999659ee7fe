"""The worker processes of one preprocessing run, and the progress bar they feed: on a
terminal, a bar over the bytes of input read, which each worker reports through a managed
queue; otherwise no bar (the driver logs one line per step)."""

from __future__ import annotations

import contextlib
import os
import queue
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Any

from tqdm import tqdm

from dlrm.utils.heap import keep_freed_memory
from dlrm.utils.workers import manager, worker_pool


class Pool:
    """``with Pool(workers, total_bytes) as pool: pool.run(fn, tasks, args)``."""

    def __init__(self, workers: int, total_bytes: int) -> None:
        self.workers, self.total_bytes = workers, total_bytes
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Pool:
        self.bar = tqdm(total=self.total_bytes, unit="B", unit_scale=True, desc="preprocess",
                        dynamic_ncols=True) if os.isatty(1) else None
        self.updates = (self._stack.enter_context(manager()).Queue()
                        if self.bar is not None else None)
        self._pool = self._stack.enter_context(worker_pool(self.workers, keep_freed_memory))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        if self.bar is not None:
            self.bar.close()

    def run(self, fn: Callable, tasks: list, args: tuple, progress: bool = False) -> None:
        """Runs ``fn(task, *args, updates)`` for every task, re-raising a worker's error
        here; ``updates`` is the queue each worker puts the bytes it has read on (None off a
        terminal, or without ``progress``: work the bar does not count, as a recount)."""
        updates = self.updates if progress else None
        pending: set[Future] = {self._pool.submit(fn, t, *args, updates) for t in tasks}
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in done:
                fut.result()
            while updates is not None:
                try:
                    n: Any = updates.get_nowait()
                except queue.Empty:
                    break
                self.bar.update(n)

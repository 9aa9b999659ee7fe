"""Worker process pools whose workers end with their parent.

A ``ProcessPoolExecutor``'s workers outlive a parent killed with SIGKILL: they sit on
their queue, holding memory and files, and clash with the rerun. Each worker here asks the
kernel (Linux ``prctl(PR_SET_PDEATHSIG)``) for SIGKILL when its parent dies, and exits at
once if the parent died before it asked. Elsewhere the pool is a plain one.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from multiprocessing.managers import SyncManager
from typing import Any

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Has this process killed when ``parent`` (its parent's pid) dies; exits now if it has
    already died (the request only covers deaths after it)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _start(parent: int, initializer: Callable[..., Any] | None, args: tuple) -> None:
    die_with_parent(parent)
    if initializer is not None:
        initializer(*args)


def worker_pool(workers: int, initializer: Callable[..., Any] | None = None,
                initargs: tuple = ()) -> ProcessPoolExecutor:
    """``workers`` spawned processes (no fork: the parent's threads and locks stay behind)
    that die with this one; ``initializer(*initargs)`` runs in each first."""
    return ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start,
                               initargs=(os.getpid(), initializer, initargs))


def manager() -> SyncManager:
    """A started ``multiprocessing`` manager (its server, a spawned process, dies with this
    one), e.g. for a queue the workers feed a progress bar through."""
    started = SyncManager(ctx=get_context("spawn"))
    started.start(die_with_parent, (os.getpid(),))
    return started

"""glibc heap settings for processes that allocate and free the same large buffers over and
over (preprocessing workers, training and evaluation ranks)."""

from __future__ import annotations

import contextlib
import ctypes

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt(3) parameters


def keep_freed_memory() -> None:
    """Keeps freed memory in the process's heap instead of handing it back to the kernel.

    By default glibc serves large blocks with mmap and trims the heap's top as soon as it
    is free, so a loop that allocates and frees the same arrays every iteration takes a
    page fault (and the kernel zeroes a page) for every page it touches, every iteration.
    Blocks up to 32 MiB (glibc's largest threshold) now come from the heap, and up to
    1 GiB of freed memory stays there for the next iteration. No-op off glibc."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)


def release_freed_memory() -> None:
    """Hands the heap's freed memory back to the kernel (``malloc_trim``): for the end of a
    one-off job whose buffers the next job will not reuse. No-op off glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)

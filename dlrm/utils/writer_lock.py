"""One writer per dataset directory: an exclusive ``flock`` on ``DIR/.dlrm-lock``.

The lock is the kernel's, so it ends with its holder, however that ends (SIGKILL included);
a stale lock file is no lock. The file names the holder (pid, host, start time) for the
error a second writer gets, and is emptied when it lets go. It stays in the directory:
deleting it would let a writer that opened it before the deletion and one that creates it
anew both hold "the" lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

LOCK = ".dlrm-lock"


@contextlib.contextmanager
def writer_lock(directory: Path, error: type[Exception], what: str) -> Iterator[None]:
    """Holds ``directory``'s lock for the block; raises ``error`` naming the holder if
    another process has it (``what``: the holder's kind, for the message)."""
    created = not directory.exists()
    path = directory / LOCK
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise error(f"{path}: cannot take the writer's lock ({e.strerror}); {directory} "
                    "must be writable") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            try:
                h = json.loads(holder)
                who = f"pid {h['pid']} on host {h['host']}, since {h['since']}"
            except (ValueError, KeyError, TypeError):
                who = "a process that has not yet written its name"
            raise error(f"{directory} is being written by another {what} ({who}); wait "
                        "for it to finish or choose another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode(), 0)
        try:
            yield
        except BaseException:
            if created and [p.name for p in directory.iterdir()] == [LOCK]:
                path.unlink()  # refused before writing anything: leave no directory behind
                directory.rmdir()
            raise
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # no holder now: the same (empty) file after every run
    finally:
        os.close(fd)  # releases the lock

"""Files: atomic writes (a reader sees the old file or the new one, never a part), TOML reads."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` to write; renames it over ``path`` once the
    block succeeds (left behind, never renamed, if it fails). The temporary name carries
    this process's pid, so that nothing another process writes is renamed over ``path``,
    and keeps the suffix (``x.tmp-123.png``) for writers that pick the format from it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}{path.suffix}")
    yield tmp
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def read_toml(path: Path, error: type[Exception], what: str) -> dict[str, Any]:
    """The TOML document at ``path``; ``error`` naming the file (a ``what`` file) when it is
    missing or not valid TOML."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise error(f"{what} file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise error(f"{path}: invalid TOML: {e}") from None


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # the errors of a write that found no room


def io_fault(e: OSError, where: Path) -> str:
    """What an I/O error means, for a message naming ``where`` (a directory being written):
    a full disk says so, with the bytes left on it."""
    path = e.filename or where
    if e.errno in DISK_FULL:
        disk = Path(e.filename).parent if e.filename else Path(where)
        try:
            free = f"{shutil.disk_usage(disk).free:,} bytes free"
        except OSError:
            free = "free space unknown"
        return f"{path}: disk full ({free} on {disk}): {e.strerror}"
    return f"{path}: {e.strerror or e}"

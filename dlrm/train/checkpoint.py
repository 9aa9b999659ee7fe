"""Checkpoints over torch.distributed.checkpoint: atomic, verified, kept K at a time.

Layout: ``CKPT_DIR/step-000000123/`` holds DCP's files (every rank writes its shards)
and ``COMPLETE.json``, written last by rank 0 after every rank has finished. It records
the step, the training position and the size and SHA-256 of every file, so a checkpoint
is complete iff its marker exists and every file matches it. Saving goes to
``step-N.partial`` and is renamed to ``step-N`` only once complete.

Checksums are shared out: each rank hashes the files it wrote, and on load each rank
checks every world-size-th file, so no rank reads the whole checkpoint while the others
wait in a collective (a 200 GB checkpoint on slow shared storage would outlast NCCL's
watchdog).

Nothing in loading unpickles arbitrary objects: our own state is JSON; DCP's
``.metadata`` (a pickle) is first read by an unpickler that admits only the
checkpoint-metadata classes of torch, and DCP reads tensor data with ``weights_only``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from dlrm.errors import CheckpointError
from dlrm.train.column_splits import rowwise_state_across_column_splits
from dlrm.train.dist import broadcast_object, gather_object
from dlrm.train.grown_tables import grown_tables
from dlrm.utils.files import DISK_FULL, atomic_write_json

logger = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
_PREFIX = "step-"


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only what DCP's metadata is made of: its own dataclasses, dtypes, sizes."""

    _ALLOWED = {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("pathlib", "PosixPath"),
        ("pathlib", "Path"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module == "torch.distributed.checkpoint.metadata"
                or (module, name) in self._ALLOWED
                or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))):
            return super().find_class(module, name)
        raise CheckpointError(f"checkpoint metadata refers to {module}.{name}, which a "
                              "checkpoint has no business holding")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()


def read_marker(path: Path) -> dict[str, Any]:
    """The marker of a complete checkpoint, unchecked against the files (see :func:`verify`)."""
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path}: incomplete (no {MARKER})")
    try:
        info = json.loads(marker.read_text())
        if not isinstance(info["files"], dict):
            raise TypeError("files is not a table")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{marker}: corrupt marker ({e})") from None
    return info


def read_metadata(path: Path) -> Any:
    """DCP's metadata of ``path``, read by an unpickler that admits only its own classes."""
    try:
        return _MetadataUnpickler(io.BytesIO((path / ".metadata").read_bytes())).load()
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable DCP metadata ({e})") from None


def verify(path: Path, share: int = 0, shares: int = 1) -> dict[str, Any]:
    """The marker of a complete, intact checkpoint; raises CheckpointError otherwise.

    Only every ``shares``-th file from the ``share``-th (in name order) is checksummed,
    so that ranks can split the work; the marker and the metadata are checked whole.
    """
    info = read_marker(path)
    for name, (size, digest) in sorted(info["files"].items())[share::shares]:
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            raise CheckpointError(f"{path}: {name} is missing or truncated")
        if _sha256(f) != digest:
            raise CheckpointError(f"{path}: {name} does not match its checksum")
    read_metadata(path)
    return info


def verify_together(path: Path) -> dict[str, Any]:
    """:func:`verify`, each rank checking its share of the files; every rank raises the
    same CheckpointError if any share is bad (all ranks call it)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        info, error = verify(path, rank, world), None
    except CheckpointError as e:
        info, error = None, str(e)
    errors = [None] * world
    dist.all_gather_object(errors, error)
    bad = [e for e in errors if e]
    if bad:
        raise CheckpointError(bad[0])
    return info


_RANK_FILE = re.compile(r"__(\d+)_\d+\.distcp$")


def _digests(directory: Path, rank: int) -> dict[str, list]:
    """Size and SHA-256 of the files this rank wrote (DCP names them ``__RANK_N.distcp``);
    rank 0 also takes the rest (DCP's ``.metadata``)."""
    out = {}
    for p in sorted(directory.iterdir()):
        owner = _RANK_FILE.match(p.name)
        if p.is_file() and (int(owner.group(1)) == rank if owner else rank == 0):
            out[p.name] = [p.stat().st_size, _sha256(p)]
    return out


class _InPlaceSavePlanner(dcp.DefaultSavePlanner):
    """DCP's save planner, less a copy of every table. fbgemm keeps a rank's tables (and
    each optimizer state) in one buffer, each table a view into it, and DCP copies a
    tensor whose storage is larger than itself before writing it: saving took as much
    memory again as the tables and their state. A contiguous view is handed over as a
    tensor over the same memory whose storage is just its own bytes."""

    def resolve_data(self, write_item: Any) -> Any:
        data = super().resolve_data(write_item)
        if (isinstance(data, torch.Tensor) and data.device.type == "cpu"
                and data.is_contiguous() and data.untyped_storage().nbytes() != data.nbytes
                and data.dtype in _NUMPY_DTYPES):
            return torch.from_numpy(data.detach().numpy())
        return data


_NUMPY_DTYPES = (torch.float32, torch.float16, torch.float64, torch.int64, torch.int32,
                 torch.int8, torch.uint8)


def _without_empty(tree: Any) -> Any:
    """``tree`` without its empty tables, leaves shared. An empty table (SGD's per-table
    state) gives DCP nothing to save, yet on load DCP looks for it and fails."""
    if not isinstance(tree, dict):
        return tree
    pruned = {k: _without_empty(v) for k, v in tree.items()}
    return {k: v for k, v in pruned.items() if not (isinstance(v, dict) and not v)}


def _copy_back(into: dict[str, Any], source: dict[str, Any]) -> None:
    """Puts the leaves DCP replaced (rather than filled in place) in ``source``, a pruned
    copy of ``into``, back into ``into``."""
    for key, value in source.items():
        if isinstance(value, dict):
            _copy_back(into[key], value)
        elif into[key] is not value:
            into[key] = value


def _causes(failure: BaseException) -> list[tuple[str, BaseException]]:
    """What went wrong, as (where, exception): DCP's error holds each failed rank's."""
    if isinstance(failure, dcp.CheckpointException):
        return [(f"rank {r}: ", exc) for r, (exc, _) in sorted(failure.failures.items())]
    return [("", failure)]


def _failure(failure: BaseException | None, partial: Path) -> str | None:
    """One line saying why writing ``partial`` failed (None: it did not), with, for a full
    disk (ENOSPC, or little left free beside a cause that says nothing of the disk), the
    bytes free where it was written, as this rank sees them."""
    if failure is None:
        return None
    causes = _causes(failure)
    errnos = {getattr(e, "errno", None) for _, e in causes} - {None}
    where = partial.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        usage = shutil.disk_usage(where)
        free = f"{usage.free:,} bytes free on {where}"
        little = usage.free < min(16 << 20, max(usage.total // 100, 64 << 10))
    except OSError:
        free, little = None, False
    full = bool(errnos & set(DISK_FULL)) or (little and not errnos)
    # OSErrors first: torch.save's own error on a full disk ("unexpected pos") says less.
    causes.sort(key=lambda c: not isinstance(c[1], OSError))
    said = "; ".join(f"{rank}{type(e).__name__}: {e}".replace("\n", " ") for rank, e in causes)
    disk = f"disk full ({free}): " if full and free else "disk full: " if full else ""
    return f"checkpoint {partial} could not be written: {disk}{said}"


class Checkpointer:
    """Saves and restores a run's state; ranks call every method together.

    Args:
        directory: where checkpoints live (``RUN/checkpoints``).
        keep: how many complete checkpoints to keep (oldest deleted first); 0: all.
    """

    def __init__(self, directory: str | Path, keep: int = 3) -> None:
        self.directory = Path(directory)
        self.keep = keep

    def _complete(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir()
                 if p.is_dir() and p.name.startswith(_PREFIX) and p.name[5:].isdigit()]
        return sorted(found, key=lambda p: int(p.name[5:]))

    def save(self, step: int, state: dict[str, Any], position: dict[str, Any],
             name: str | None = None) -> Path:
        """Writes ``state`` (DCP-compatible: state dicts of the model and optimizers) and
        ``position`` (JSON: step, epoch, batches consumed...). Returns the checkpoint:
        ``step-N``, or ``name``, which is neither resumed from nor pruned.

        Raises:
            CheckpointError: on every rank together, where writing failed on any (a full
                disk, DCP's error); the message names the path and the cause, and the
                ``.partial`` directory is removed.
        """
        final = self.directory / (name or f"{_PREFIX}{step:09d}")
        partial = final.with_name(final.name + ".partial")
        rank = dist.get_rank()
        failure = None
        if rank == 0:
            try:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
            except OSError as e:
                failure = e
        self._agree(failure, partial)
        try:
            dcp.save(_without_empty(state), checkpoint_id=str(partial),
                     planner=_InPlaceSavePlanner())
            digests, failure = _digests(partial, rank), None
        except (OSError, dcp.CheckpointException) as e:  # DCP's: raised on every rank
            digests, failure = {}, e
        # Each rank hashes what it wrote; the gather is also the wait for every rank's files.
        shares = gather_object((digests, _failure(failure, partial)))
        self._raise_any([report for _, report in shares], partial)
        failure = None
        if rank == 0:
            files = {name: entry for share, _ in shares for name, entry in share.items()}
            try:
                atomic_write_json(partial / MARKER,
                                  {"step": step, "position": position, "files": dict(sorted(
                                      files.items()))})
                shutil.rmtree(final, ignore_errors=True)
                os.replace(partial, final)
            except OSError as e:
                failure = e
            else:
                self._retain()
        self._agree(failure, partial)
        return final

    def _agree(self, failure: BaseException | None, partial: Path) -> None:
        """Every rank learns whether any failed (a collective: all ranks call it)."""
        self._raise_any(gather_object(_failure(failure, partial)), partial)

    def _raise_any(self, reports: list[str | None], partial: Path) -> None:
        """The first rank's failure, raised on every rank; rank 0 first removes the partial
        checkpoint, which would otherwise keep the disk full."""
        bad = [r for r in reports if r]
        if not bad:
            return
        if dist.get_rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointError(f"{bad[0]}; removed {partial}")

    def remove_partials(self) -> list[Path]:
        """Removes the ``*.partial`` directories that saves which never finished left in
        this checkpoint directory (at a run's start-up, by one rank); returns them."""
        if not self.directory.is_dir():
            return []
        stale = sorted(p for p in self.directory.iterdir()
                       if p.is_dir() and p.name.endswith(".partial"))
        for p in stale:
            logger.warning("removing %s, left by a checkpoint that did not finish", p)
            shutil.rmtree(p, ignore_errors=True)
        return stale

    def _retain(self) -> None:
        if not self.keep:
            return
        complete = [p for p in self._complete() if (p / MARKER).is_file()]
        for old in complete[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies; bad ones are skipped with a warning (all
        ranks call it: rank 0's listing is used, and each rank checks its share)."""
        candidates = broadcast_object([str(p) for p in self._complete()])
        for path in map(Path, reversed(candidates)):
            try:
                verify_together(path)
                return path
            except CheckpointError as e:
                if dist.get_rank() == 0:
                    logger.warning("skipping checkpoint: %s", e)
        return None

    def load(self, path: str | Path, state: dict[str, Any], grow: bool = False
             ) -> dict[str, Any]:
        """Fills ``state`` in place from ``path`` (resharding as needed; ``grow``: into
        tables with more rows, see ``grown_tables``); returns its position. Raises
        CheckpointError for an incomplete, corrupt or unsafe one (all ranks call it)."""
        path = Path(path)
        info = verify_together(path)
        pruned = _without_empty(state)
        metadata = read_metadata(path)
        with (rowwise_state_across_column_splits(pruned, metadata),
              grown_tables(pruned, metadata) if grow else contextlib.nullcontext()):
            dcp.load(pruned, checkpoint_id=str(path))
        _copy_back(state, pruned)
        return info["position"]

"""Managed features' ids (a schema's ``encoding = "managed"``): raw ids for training, and
an exported model's lookup from raw id to row.

In preprocessing a value becomes its raw id (:func:`managed_ids`); in training TorchRec's
managed-collision modules map raw ids to rows. An exported model has no such module: its
tables are plain, and each managed feature's :class:`ManagedLookup` (the modules'
state, read from the checkpoint) gives the row each raw id had when training ended. An id
without a row gets the row the sharded model gave it: the reserved last row of the rank
that owns the id's range of values (ranks own equal blocks of raw values).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlrm.schema.features import MANAGED_LIMIT
from dlrm.utils.files import atomic_path

GOLDEN_INT = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: multiplicative hashing (vocab's too)
_GOLDEN = np.uint64(GOLDEN_INT)


def managed_ids(values: np.ndarray) -> np.ndarray:
    """Raw ids of a managed feature: each 64-bit value hashed (a bijection, then folded)
    into [2, MANAGED_LIMIT), so that ids spread evenly over the range the collision module
    cuts into ranks' value ranges; 0 stays the missing value's. MANAGED_LIMIT itself (the
    int64 maximum) is the module's mark of an empty row: no id takes it."""
    mixed = values.astype(np.uint64) * _GOLDEN
    return (mixed % np.uint64(MANAGED_LIMIT - 2)).astype(np.int64) + 2


def managed_id(value: int) -> int:
    """:func:`managed_ids` of one value (a Python int below 2**64)."""
    return (value * GOLDEN_INT % (1 << 64)) % (MANAGED_LIMIT - 2) + 2


def lookup_path(tables: Path, feature: str) -> Path:
    return tables / f"{feature}.managed.npz"


@dataclass(frozen=True)
class ManagedLookup:
    """One feature's raw id → row: ``keys`` (raw ids, ascending) hold rows ``rows``; a
    raw id outside them gets ``miss_rows[id // block]``, its rank's reserved row."""

    keys: np.ndarray
    rows: np.ndarray
    miss_rows: np.ndarray
    block: int

    def rows_of(self, raw: np.ndarray) -> np.ndarray:
        at = np.minimum(np.searchsorted(self.keys, raw), max(self.keys.size - 1, 0))
        hit = self.keys[at] == raw if self.keys.size else np.zeros(raw.shape, bool)
        miss = self.miss_rows[raw // self.block]
        return np.where(hit, self.rows[at] if self.keys.size else miss, miss)

    def row_of(self, raw: int) -> int:
        at = int(np.searchsorted(self.keys, raw))
        if at < self.keys.size and int(self.keys[at]) == raw:
            return int(self.rows[at])
        return int(self.miss_rows[raw // self.block])

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, keys=self.keys, rows=self.rows, miss_rows=self.miss_rows,
                     block=np.int64(self.block))

    @classmethod
    def load(cls, path: Path) -> ManagedLookup:
        with np.load(path) as z:
            return cls(z["keys"], z["rows"], z["miss_rows"], int(z["block"]))

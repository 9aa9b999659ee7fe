"""Categorical values → ids: the hash rule, or vocabularies from exact counts.

A feature's vocabulary is the values seen at least ``min_frequency`` times, by descending
count (ties by value), capped at ``max_vocab`` (counted and merged by ``vocab_merge``).
Lookups go through an open-addressing hash table per feature, built vectorised and
memory-mapped by each worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dlrm.rows.managed import GOLDEN_INT, ManagedLookup, lookup_path, managed_id, managed_ids
from dlrm.schema.features import MISSING_ID, OOV_ID
from dlrm.utils.files import atomic_path


@dataclass(frozen=True)
class Encoding:
    """How categorical values become ids; recorded in the manifest."""

    type: str = "vocab"  # "vocab", "hash" or "managed"
    min_frequency: int = 1  # vocab: values seen fewer times map to OOV_ID
    max_vocab: int = 0  # vocab: keep at most this many values per feature; 0: no cap
    buckets: int = 40_000_000  # hash: ids are 1 + value % (buckets - 1); 0 is missing
    size: int = 0  # managed: the table's rows, the ids the model's collision module admits
    eviction: str = "lfu"  # managed: which ids leave a full table (lfu or lru)

    def to_json(self) -> dict[str, Any]:
        if self.type == "hash":
            return {"type": "hash", "buckets": self.buckets}
        if self.type == "managed":
            return {"type": "managed", "size": self.size, "eviction": self.eviction}
        return {"type": "vocab", "min_frequency": self.min_frequency, "max_vocab": self.max_vocab}

    @property
    def rows(self) -> int:
        """The table rows of a feature not vocab-encoded (a vocabulary's: its size + 2)."""
        return self.size if self.type == "managed" else self.buckets


def compact(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Merges (values, counts) pairs into one, summing the counts of equal values."""
    if not parts:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    values = np.concatenate([v for v, _ in parts])
    counts = np.concatenate([c for _, c in parts])
    uniq, inverse = np.unique(values, return_inverse=True)
    return uniq, np.bincount(inverse, weights=counts, minlength=uniq.size).astype(np.int64)


_GOLDEN_INT, _U64 = GOLDEN_INT, (1 << 64) - 1
_GOLDEN = np.uint64(_GOLDEN_INT)  # hashing


def _slots(values: np.ndarray, bits: int) -> np.ndarray:
    return ((values * _GOLDEN) >> np.uint64(64 - bits)).astype(np.int64)


def table_slots(size: int) -> int:
    """Slots of a vocabulary's hash table: a power of two, at least twice its size."""
    return 1 << max(4, (2 * size - 1).bit_length())


def fill_table(vocab: np.ndarray, keys: np.ndarray, ids: np.ndarray, batch: int) -> None:
    """Fills an empty open-addressing hash table with linear probing (``keys``; ``ids``,
    -1 where a slot is empty) with ``vocab``, ``batch`` values at a time (its memory).

    Each batch is placed in rounds: every value not yet placed tries its next slot; of
    those that find the slot empty, the first (in vocabulary order) takes it. A value thus
    sits after an unbroken run of full slots from its home slot, which is what a probe
    relies on.
    """
    bits = keys.size.bit_length() - 1
    for start in range(0, vocab.size, batch):
        values = np.asarray(vocab[start:start + batch])
        pending = np.arange(values.size)
        slot = _slots(values, bits)
        while pending.size:
            free = np.flatnonzero(ids[slot] < 0)
            taken, first = np.unique(slot[free], return_index=True)
            won = free[first]
            ids[taken] = start + pending[won] + 2
            keys[taken] = values[pending[won]]
            lost = np.ones(pending.size, bool)
            lost[won] = False
            pending, slot = pending[lost], (slot[lost] + 1) & (keys.size - 1)


def hash_table(vocab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A vocabulary (values in id order, id = position + 2) as a hash table in memory:
    (keys, ids), see ``fill_table``."""
    slots = table_slots(vocab.size)
    keys, ids = np.zeros(slots, np.uint64), np.full(slots, -1, np.int32)
    fill_table(vocab, keys, ids, max(1, vocab.size))
    return keys, ids


def probe(keys: np.ndarray, ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The id of each value in the table, OOV_ID for those it does not hold."""
    mask = keys.size - 1
    slot = _slots(values, mask.bit_length())
    found = ids[slot]
    full = found >= 0
    hit = full & (keys[slot] == values)
    out = np.where(hit, found, OOV_ID).astype(np.int64)
    todo = np.flatnonzero(full & ~hit)  # a slot holding another value: try the next
    slot = slot[todo]
    while todo.size:
        slot = (slot + 1) & mask
        found = ids[slot]
        full = found >= 0
        hit = full & (keys[slot] == values[todo])
        out[todo[hit]] = found[hit]
        more = full & ~hit
        todo, slot = todo[more], slot[more]
    return out


class Encoder:
    """Categorical values → ids, each feature by its encoding: the hash rule, its
    vocabulary (``tables``: the directory that ``save_tables`` wrote), or a managed
    feature's raw ids (an exported model's ``tables``: their rows, ``ManagedLookup``).
    Pickled into every task without the tables; each process maps a table from disk when
    it first needs it."""

    def __init__(self, names: tuple[str, ...], encodings: tuple[Encoding, ...],
                 tables: str | None = None):
        self.names, self.encodings, self.tables = names, encodings, tables
        self._loaded: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lookups: dict[int, ManagedLookup | None] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_loaded": {}, "_lookups": {}}

    def ids(self, f: int, values: np.ndarray, present: np.ndarray | None = None) -> np.ndarray:
        """The ids of feature ``f``'s ``values``; ``MISSING_ID`` where not ``present``."""
        enc = self.encodings[f]
        if enc.type == "hash":
            ids = (values % np.uint64(enc.buckets - 1)).astype(np.int64) + 1
        elif enc.type == "managed":
            ids = managed_ids(values)
            if present is not None:
                ids = np.where(present, ids, MISSING_ID)  # the raw id of a missing value
            lookup = self._lookup(f)
            return ids if lookup is None else lookup.rows_of(ids)
        else:
            ids = probe(*self._table(f), values)
        return ids if present is None else np.where(present, ids, MISSING_ID)

    def id_of(self, f: int, value: int) -> int:
        """The id of one value of feature ``f`` (a Python int below 2**64): ``ids``' for
        one value, without its per-call cost."""
        enc = self.encodings[f]
        if enc.type == "hash":
            return value % (enc.buckets - 1) + 1
        if enc.type == "managed":
            lookup = self._lookup(f)
            return managed_id(value) if lookup is None else lookup.row_of(managed_id(value))
        keys, ids = self._table(f)
        mask = keys.size - 1
        slot = ((value * _GOLDEN_INT) & _U64) >> (64 - mask.bit_length())
        while True:  # ``probe``'s linear probing, one value
            found = int(ids[slot])
            if found < 0:
                return OOV_ID
            if int(keys[slot]) == value:
                return found
            slot = (slot + 1) & mask

    def missing_id(self, f: int) -> int:
        """The id of feature ``f``'s missing value: ``MISSING_ID``, or where an exported
        model's lookup maps a managed feature's raw ids, the row of that raw id."""
        lookup = self._lookup(f) if self.encodings[f].type == "managed" else None
        return MISSING_ID if lookup is None else lookup.row_of(MISSING_ID)

    def _lookup(self, f: int) -> ManagedLookup | None:
        """An exported model's rows of a managed feature's raw ids (None: none, raw ids)."""
        if f not in self._lookups:
            path = lookup_path(Path(self.tables), self.names[f]) if self.tables else None
            self._lookups[f] = ManagedLookup.load(path) if path and path.is_file() else None
        return self._lookups[f]

    def _table(self, f: int) -> tuple[np.ndarray, np.ndarray]:
        if f not in self._loaded:
            def load(path: Path) -> np.ndarray:  # mapped, as a plain array (faster)
                return np.asarray(np.load(path, mmap_mode="r"))

            keys, ids = table_paths(Path(self.tables), self.names[f])
            self._loaded[f] = (load(keys), load(ids))
        return self._loaded[f]


def save_tables(vocabs: dict[str, np.ndarray], tables: Path) -> None:
    """Each feature's vocabulary as a hash table (``NAME.keys.npy``, ``NAME.ids.npy``)."""
    tables.mkdir(parents=True, exist_ok=True)
    for c, vocab in vocabs.items():
        for path, array in zip(table_paths(tables, c), hash_table(vocab), strict=True):
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, array)


def table_paths(tables: Path, feature: str) -> tuple[Path, Path]:
    """A feature's hash table files in the directory ``tables``: (keys, ids)."""
    return tables / f"{feature}.keys.npy", tables / f"{feature}.ids.npy"

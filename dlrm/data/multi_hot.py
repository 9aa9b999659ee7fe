"""MLPerf DLRMv2's synthetic multi-hot bags: one-hot ids expanded into fixed-size bags."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

_DRAW_ROWS = 1 << 20  # table rows drawn per call: caps the int64 temporary, same stream


@functools.lru_cache(maxsize=2)
def _multi_hot_tables(sizes: tuple[int, ...], cardinalities: tuple[int, ...],
                      seed: int) -> tuple[np.ndarray | None, ...]:
    rng = np.random.RandomState(seed)  # the reference: np.random.seed(0), np.random.randint
    tables: list[np.ndarray | None] = []
    for size, card in zip(sizes, cardinalities, strict=True):
        if size == 1:  # the reference draws (card, 0) ids here: nothing, the stream is unmoved
            tables.append(None)  # the identity: ids pass through
            continue
        table = np.empty((card, size), np.int32 if card <= 2**31 else np.int64)
        table[:, 0] = np.arange(card)
        for start in range(0, card, _DRAW_ROWS):
            stop = min(start + _DRAW_ROWS, card)
            table[start:stop, 1:] = rng.randint(0, card, size=(stop - start, size - 1))
        tables.append(table)
    return tuple(tables)


class MultiHot:
    """MLPerf DLRMv2's synthetic multi-hot expansion of one-hot ids.

    Follows torchrec_dlrm's ``Multihot`` with ``dist_type="uniform"`` (facebookresearch/dlrm,
    ``torchrec_dlrm/multi_hot.py``): the MLPerf Training DLRMv2 reference, which also wrote
    the multi-hot Criteo 1TB dataset with it (``materialize_synthetic_multihot_dataset.py``).
    Feature f, with C_f ids and bag size s_f, gets a lookup table ``[C_f, s_f]``: column 0 is
    the id itself, the other s_f - 1 columns are ids drawn once, uniformly from [0, C_f), by
    ``np.random.RandomState(seed).randint(0, C_f, (C_f, s_f - 1))``, feature after feature:
    the reference's ``np.random.seed(0)`` and ``np.random.randint`` calls. With ``seed=0``
    the tables are the reference's, so an id becomes the same bag as in MLPerf. (The extra
    ids are drawn independently for every id; they are not per-feature offsets
    ``(i + o_k) % C_f``, which the reference does not use.)

    Missing values (id 0) are expanded like every other id, as in the reference (torchrec's
    Criteo preprocessing maps them to id 0 too and the reference does not single them out):
    every bag of feature f has exactly s_f ids, first the original id.

    Memory: Σ C_f × (s_f - 1) int32 per process (no table where s_f = 1), built once per
    process and shared by every loader. With MLPerf's sizes on Criteo 1TB (40M-row tables)
    that is ~23 GB, which is why MLPerf materialises the bags offline; on hash-capped
    or small vocabularies it is small.
    """

    def __init__(self, sizes: Sequence[int], cardinalities: Sequence[int], seed: int = 0, *,
                 names: Sequence[str]) -> None:
        n = len(names)
        if len(sizes) != n or not all(s >= 1 for s in sizes):
            raise ValueError(f"multi_hot_sizes: need {n} ints >= 1, got {list(sizes)}")
        if len(cardinalities) != n or not all(c >= 1 for c in cardinalities):
            raise ValueError(f"cardinalities: need {n} ints >= 1, got {cardinalities}")
        self.names = list(names)
        self.sizes = [int(s) for s in sizes]
        self.cardinalities = [int(c) for c in cardinalities]
        self.seed = seed
        self.tables = _multi_hot_tables(tuple(self.sizes), tuple(self.cardinalities), seed)

    def expand(self, feature: int, ids: np.ndarray) -> np.ndarray:
        """The bags of ``ids`` (feature index ``feature``), concatenated: [len(ids) × s_f]."""
        table = self.tables[feature]
        if table is None:
            return ids
        if ids.size and (ids.min() < 0 or ids.max() >= len(table)):
            raise ValueError(f"{self.names[feature]}: ids must lie in [0, {len(table)}), the "
                             f"feature's cardinality; got [{ids.min()}, {ids.max()}]")
        return table[ids].reshape(-1).astype(np.int64)

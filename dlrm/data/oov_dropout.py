"""Out-of-vocabulary dropout: a share of the training rows see the OOV id instead of their
own, so that the OOV row trains and a value first seen after training (a new user) is
scored by a learnt row rather than a random one (``data.oov_dropout``).

Each draw is a function of (seed, epoch, the row's number in its split, feature) only, so
that resuming, and any number of ranks, drop the same ids.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dlrm.schema.features import MISSING_ID, OOV_ID


def uniform(seed: int, epoch: int, rows: np.ndarray, feature: int) -> np.ndarray:
    """A uniform [0, 1) draw per row that depends on (seed, epoch, row, feature) alone
    (splitmix64 of their mix), so that any rank count and any resume draw the same."""
    with np.errstate(over="ignore"):
        x = (rows.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
             ^ np.uint64((seed * 0x100000001B3 + epoch * 0x1000193 + feature * 0xC2B2AE35)
                         % 2**64))
        for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            x = (x ^ (x >> np.uint64(shift))) * np.uint64(mult)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(2**53)


def drop_to_oov(sparse: list[Any], row: np.ndarray, rates: dict[int, float], seed: int,
                epoch: int) -> None:
    """Replaces, in ``sparse`` (per feature: ids, or a list array of bags, of the rows
    numbered ``row`` in their split), the id of a share ``rates[f]`` of the rows of
    feature ``f`` (a whole bag, of a bag feature) by the out-of-vocabulary id; missing ids
    stay."""
    for f, p in rates.items():
        drop = uniform(seed, epoch, row, f) < p
        column = sparse[f]
        if isinstance(column, np.ndarray):
            sparse[f] = np.where(drop & (column != MISSING_ID), OOV_ID, column)
        else:
            values = column.flatten().to_numpy(zero_copy_only=False)
            parent = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
            values = np.where(drop[parent] & (values != MISSING_ID), OOV_ID, values)
            offsets = column.offsets.to_numpy()
            sparse[f] = pa.ListArray.from_arrays(pa.array(offsets - offsets[0]),
                                                      pa.array(values, pa.int64()))

"""Rows in memory and the ``torchrec.datasets.utils.Batch`` made of them: the training
loader's and the scorer's alike.

A dataset table's rows become :class:`Rows` (numpy columns; a bag feature as a pyarrow list
array) with the manifest's dense statistics applied and missing ids filled
(:func:`table_rows`); rows become a Batch whose KJT holds one bag per row and feature,
feature-major (:func:`to_batch`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm.data.multi_hot import MultiHot
from dlrm.schema.features import MISSING_ID, Features

BAGS = pa.list_(pa.int64())  # the type list columns are read as


def is_list_type(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def filled(column: Any, value: int) -> Any:
    return pc.fill_null(column, value) if column.null_count else column


@dataclass
class Rows:
    """Rows in memory: numpy columns; a list (multi-hot) feature as a pyarrow list array."""

    labels: np.ndarray  # [n] float32
    dense: np.ndarray  # [n, dense features] float32
    sparse: list[Any]  # per feature: [n] int64 ids, or a list<int64> array of n bags
    row: np.ndarray | None = None  # [n] each row's number in the split, where needed

    def __len__(self) -> int:
        return len(self.labels)

    def slice(self, start: int, stop: int) -> Rows:
        # numpy and pyarrow both slice without copying
        return Rows(self.labels[start:stop], self.dense[start:stop],
                     [c[start:stop] for c in self.sparse],
                     None if self.row is None else self.row[start:stop])

    def take(self, index: np.ndarray) -> Rows:
        arrow_index = pa.array(index)
        return Rows(self.labels[index], self.dense[index],
                     [c[index] if isinstance(c, np.ndarray) else c.take(arrow_index)
                      for c in self.sparse], None if self.row is None else self.row[index])

    @staticmethod
    def concat(parts: list[Rows]) -> Rows:
        if len(parts) == 1:
            return parts[0]
        rows = [p.row for p in parts]
        return Rows(np.concatenate([p.labels for p in parts]),
                     np.concatenate([p.dense for p in parts]),
                     [np.concatenate(cs) if isinstance(cs[0], np.ndarray) else pa.concat_arrays(cs)
                      for cs in zip(*(p.sparse for p in parts), strict=True)],
                     None if any(r is None for r in rows) else np.concatenate(rows))


def to_batch(rows: Rows, keys: Sequence[str], multi_hot: MultiHot | None = None) -> Batch:
    """The Batch of ``rows``: KJT values feature-major under ``keys`` (the categorical
    features' names), one bag per row and feature."""
    n = len(rows)
    values: list[np.ndarray] = []
    lengths: list[np.ndarray | int] = []
    for f, column in enumerate(rows.sparse):
        if isinstance(column, np.ndarray):
            size = multi_hot.sizes[f] if multi_hot is not None else 1
            values.append(multi_hot.expand(f, column) if size > 1 else column)
            lengths.append(size)
        else:
            flat = column.flatten()  # respects the slice offset and skips null bags
            values.append(filled(flat, MISSING_ID).to_numpy())
            lengths.append(filled(pc.list_value_length(column), 0).to_numpy())
    if all(isinstance(x, int) and x == 1 for x in lengths):
        lengths_array = np.ones(n * len(lengths), np.int32)  # the one-hot fast path
    else:
        lengths_array = np.concatenate(
            [np.full(n, x, np.int32) if isinstance(x, int) else x.astype(np.int32)
             for x in lengths])
    values_array = np.concatenate(values).astype(np.int64, copy=False)
    # Each key's number of values, known here: the KJT need not sum its lengths (a torch
    # op and a read back per batch, from_lengths_sync's cost).
    per_key = [n * x if isinstance(x, int) else int(x.sum()) for x in lengths]
    return Batch(
        dense_features=torch.from_numpy(rows.dense),
        sparse_features=KeyedJaggedTensor(
            keys=list(keys), values=torch.from_numpy(values_array),
            lengths=torch.from_numpy(lengths_array), stride=n, length_per_key=per_key,
            offset_per_key=[0, *itertools.accumulate(per_key)]),
        labels=torch.from_numpy(rows.labels),
    )


def table_rows(table: pa.Table, features: Features, list_features: Sequence[bool],
               where: Any) -> Rows:
    """A dataset table's rows as the model reads them: dense features standardized by the
    manifest's training statistics, missing ids filled. ``where`` names the table in the
    error for a column of the wrong kind."""
    labels = table.column(features.label).to_numpy().astype(np.float32)
    dense = np.stack([filled(table.column(c), 0).to_numpy() for c in features.dense],
                     axis=1) if features.dense else np.zeros((len(labels), 0))
    standardize(dense, features)
    sparse: list[Any] = []
    for name, is_list in zip(features.sparse, list_features, strict=True):
        column = table.column(name)
        if is_list_type(column.type) != is_list:
            raise ValueError(f"{where}: column {name} is {column.type}, but "
                             f"{'a list' if is_list else 'an integer'} column in the "
                             "split's first file")
        if is_list:
            bags = column.combine_chunks()
            sparse.append(bags if bags.type == BAGS else bags.cast(BAGS))
        else:
            sparse.append(filled(column, MISSING_ID).to_numpy().astype(np.int64, copy=False))
    return Rows(labels, dense.astype(np.float32, copy=False), sparse)


def standardize(dense: np.ndarray, features: Features) -> None:
    """Standardizes, in place, the dense features (columns of ``dense``, in
    ``features.dense``'s order) that the manifest's training statistics name."""
    for name, mean, std in features.standardize:
        j = features.dense.index(name)
        dense[:, j] = (dense[:, j] - mean) / std


def make_batch(labels: np.ndarray, dense: np.ndarray, sparse: np.ndarray,
               keys: Sequence[str]) -> Batch:
    """Builds a Batch from ``labels [B]``, ``dense [B, D]`` and ``sparse ids [B, F]`` (the
    F features named by ``keys``).

    One id per row and feature, so every KJT length is 1 and the values are the ids
    feature-major, as KeyedJaggedTensor lays them out.
    """
    rows = Rows(labels.astype(np.float32), np.ascontiguousarray(dense, dtype=np.float32),
                 list(sparse.T))
    return to_batch(rows, keys)

"""A checkpoint's tables loaded into larger ones: a warm start onto a dataset whose
vocabularies grew (``dlrm preprocess --like DATASET --grow``, then ``dlrm train
--init-from CK``).

A grown vocabulary only appends ids, so row ``i`` of a saved table is row ``i`` of the
grown one. Each tensor of the state whose saved size is smaller along its first dimension
only (a table, or an optimizer state kept per row such as Adam's moments or row-wise
Adagrad's accumulator) is read whole from the checkpoint and its rows copied into this
run's shards; the rows past the saved ones keep what this run gave them: a fresh table's
initialisation and a fresh (zero) optimizer state. DCP reads everything else itself.

Reading a grown table whole costs each rank holding a shard of it the saved table's size
in memory for the load; the tables of this stack's checkpoints fit (a rank's reading of
only its rows would need a sharded target per table).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor


def _saved_size(metadata: Any, fqn: str) -> list[int] | None:
    entry = metadata.state_dict_metadata.get(fqn)
    size = getattr(entry, "size", None)
    return None if size is None else list(size)


def _leaves(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[dict, str, str]]:
    """(the dict holding it, its key, its DCP name) of every leaf of ``tree``."""
    for key, value in tree.items():
        fqn = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _leaves(value, f"{fqn}.")
        else:
            yield tree, key, fqn


@contextlib.contextmanager
def grown_tables(state: dict[str, Any], metadata: Any) -> Iterator[None]:
    """Around a ``dcp.load(state, ...)``: each tensor the checkpoint holds with fewer rows
    (and otherwise the same shape) is read whole, then copied into ``state``'s rows."""
    pending = []  # (the dict holding it, key, live tensor, saved whole)
    for holder, key, fqn in _leaves(state):
        live = holder[key]
        if not isinstance(live, torch.Tensor):  # ShardedTensor is a Tensor too
            continue
        saved = _saved_size(metadata, fqn)
        shape = list(live.size())
        if saved is None or not shape or saved == shape or saved[1:] != shape[1:] \
                or saved[0] > shape[0]:
            continue  # the same, or a mismatch DCP reports
        whole = torch.zeros(saved, dtype=live.dtype)
        pending.append((holder, key, live, whole))
        holder[key] = whole
    try:
        yield
    finally:
        for holder, key, live, _ in pending:
            holder[key] = live
    for _, _, live, whole in pending:
        rows = whole.size(0)
        if isinstance(live, ShardedTensor):
            for shard in live.local_shards():
                offsets, sizes = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                first = offsets[0]
                n = max(0, min(first + sizes[0], rows) - first)
                if not n:
                    continue
                part = whole[first:first + n]
                for dim in range(1, whole.dim()):  # a column shard: its columns
                    part = part.narrow(dim, offsets[dim], sizes[dim])
                shard.tensor[:n].copy_(part)
        else:
            with torch.no_grad():
                live[:rows].copy_(whole)

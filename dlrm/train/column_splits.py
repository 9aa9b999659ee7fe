"""Row-wise optimizer state of a column-wise-sharded table, restored across any split.

TorchRec keeps one row-wise accumulator (row-wise Adagrad's ``momentum1``) per column
shard of a table: a table cut into k column shards saves a state of ``k × rows`` values,
block i belonging to the i-th shard from the left. A plan that cuts the same table into
m ≠ k shards expects ``m × rows`` values, and torch.distributed.checkpoint refuses the
mismatch. Here the saved blocks are read whole and each new block gets the accumulator
its columns had: the width-weighted mean of the saved blocks over its columns. The
accumulator is the running sum of each row's mean squared gradient over the shard's
columns, so merging shards this way is exact (k → 1 gives the unsplit table's state);
splitting one keeps its value for every part, the best the saved state can tell.

A table that grew since (``grown_tables``) has more rows than the saved blocks: each
block's saved rows are converted so, and its new rows keep their fresh (zero) state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor

# Our checkpoint's layout (``Trainer._state``): the optimizer's state of the parameter
# ``embedding.FQN`` (CombinedOptimizer's prefix) belongs to the model's ``FQN``.
_OPTIM_STATE, _MODEL, _EMBEDDING_PREFIX = ("optim", "state"), "model", "embedding."


def _column_ranges(chunks: list[tuple[list[int], list[int]]]) -> list[tuple[int, int]]:
    """The distinct (first column, width) of a table's chunks (offsets, sizes), left first."""
    return sorted({(offsets[1], sizes[1]) for offsets, sizes in chunks})


def _live_chunks(weight: ShardedTensor) -> list[tuple[list[int], list[int]]]:
    return [(list(m.shard_offsets), list(m.shard_sizes))
            for m in weight.metadata().shards_metadata]


def _saved_chunks(metadata: Any,
                  fqn: str) -> tuple[int, list[tuple[list[int], list[int]]]] | None:
    """The saved table's rows and its chunks (offsets, sizes)."""
    entry = metadata.state_dict_metadata.get(fqn)
    chunks = getattr(entry, "chunks", None)
    if not chunks or len(entry.size) != 2:
        return None
    return entry.size[0], [(list(c.offsets), list(c.sizes)) for c in chunks]


def _blend(saved: torch.Tensor, rows: int, saved_cols: list[tuple[int, int]],
           first: int, width: int) -> torch.Tensor:
    """The accumulator of columns [first, first + width): the saved blocks' values,
    weighted by how many of those columns each covers."""
    out = torch.zeros(rows, dtype=torch.float64)
    for i, (start, w) in enumerate(saved_cols):
        overlap = min(first + width, start + w) - max(first, start)
        if overlap > 0:
            out += saved[i * rows:(i + 1) * rows].double() * overlap
    return out / width


@contextlib.contextmanager
def rowwise_state_across_column_splits(state: dict[str, Any], metadata: Any) -> Iterator[None]:
    """Around a ``dcp.load(state, ...)``: each row-wise state whose saved size differs
    from this plan's is read whole instead, then converted into this plan's blocks (see
    the module's doc). Other entries are left to DCP, which reshards them itself."""
    try:
        optim_state = state[_OPTIM_STATE[0]][_OPTIM_STATE[1]]
        model = state[_MODEL]
    except (KeyError, TypeError):
        yield
        return
    pending = []  # (the parameter's states, key, live tensor, saved whole, rows, columns...)
    for param, states in optim_state.items():
        weight_fqn = param.removeprefix(_EMBEDDING_PREFIX)
        weight = model.get(weight_fqn)
        if not isinstance(weight, ShardedTensor) or not isinstance(states, dict):
            continue
        saved = _saved_chunks(metadata, f"{_MODEL}.{weight_fqn}")
        for key, live in states.items():
            fqn = f"{'.'.join(_OPTIM_STATE)}.{param}.{key}"
            entry = metadata.state_dict_metadata.get(fqn)
            if not isinstance(live, ShardedTensor) or live.dim() != 1 or saved is None \
                    or entry is None or len(entry.size) != 1:
                continue
            rows, (saved_rows, saved_chunks) = weight.size(0), saved
            saved_cols = _column_ranges(saved_chunks)
            live_cols = _column_ranges(_live_chunks(weight))
            unchanged = entry.size[0] == live.size(0) and saved_rows == rows
            one_block = len(saved_cols) == len(live_cols) == 1
            if unchanged or one_block or entry.size[0] != saved_rows * len(saved_cols) \
                    or live.size(0) != rows * len(live_cols):
                # One block on both sides (DCP's, or grown_tables's if the table grew), or
                # not a row-wise state of this table (DCP reports the mismatch).
                continue
            whole = torch.zeros(entry.size[0], dtype=live.dtype)
            pending.append((states, key, live, whole, rows, saved_rows, saved_cols,
                            live_cols))
            states[key] = whole  # DCP reads a plain tensor whole on every rank
    try:
        yield
    finally:
        for states, key, live, *_ in pending:
            states[key] = live
    for _, _, live, whole, rows, saved_rows, saved_cols, live_cols in pending:
        for shard in live.local_shards():  # column blocks, or row ranges of one block
            block, first_row = divmod(shard.metadata.shard_offsets[0], rows)
            first, width = live_cols[block]
            blended = _blend(whole, saved_rows, saved_cols, first, width)
            part = blended[first_row:first_row + shard.tensor.numel()]
            shard.tensor[:part.numel()].copy_(part)


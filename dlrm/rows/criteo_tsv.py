"""Criteo's TSV rows parsed into blocks: label, 13 dense and 26 hex categorical columns.

The byte-level fast path of ``configs/schemas/criteo.toml``: fields split by pyarrow's CSV
reader as raw bytes, then checked and converted by the column codecs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from dlrm.rows.blocks import Block, RowProblems, read_blocks, split_fields
from dlrm.rows.chunks import Options, Task
from dlrm.rows.codecs import column_bytes, dense_column, hex_column, label_column
from dlrm.rows.rejects import Reject
from dlrm.schema.features import DENSE_NAMES, LABEL, SPARSE_NAMES, TSV_COLUMNS


def empty(rejects: list[Reject], lines: int) -> Block:
    """A block of no rows (only rejects)."""
    hex_ = [(np.zeros(0, np.uint64), np.zeros(0, bool)) for _ in SPARSE_NAMES]
    dense = [np.zeros(0, np.float32) for _ in DENSE_NAMES]
    return Block(np.zeros(0, np.int8), dense, hex_, rejects, lines)


def criteo_blocks(task: Task, opts: Options,
                  progress: Callable[[int], None] = lambda n: None) -> Iterator[Block]:
    """Parsed blocks of a chunk of Criteo TSV."""
    return read_blocks(task, opts, parse, empty, progress)


def parse(buf: bytes, line_of: np.ndarray) -> Block:
    """Splits, checks and converts the fields of ``buf`` (whole lines); rows with problems
    become rejects. ``line_of[k]`` is the line number of the k-th line of ``buf``."""
    table, valid_lines, rejects = split_fields(buf, line_of, TSV_COLUMNS, "\t", quoted=False)
    problems = RowProblems(table.num_rows)
    label, ok = label_column(*column_bytes(table.column(LABEL)))
    problems.mark(ok, "bad_label")
    dense = []
    for c in DENSE_NAMES:
        x, ok = dense_column(table.column(c))
        problems.mark(ok, "bad_dense")
        dense.append(x)
    hex_ = []
    for c in SPARSE_NAMES:
        values, present, ok = hex_column(*column_bytes(table.column(c)))
        problems.mark(ok, "bad_categorical")
        hex_.append((values, present))
    good = problems.good()
    if good is not None:
        rejects += problems.rejects(buf, line_of, valid_lines)
        label, dense = label[good], [x[good] for x in dense]
        hex_ = [(v[good], p[good]) for v, p in hex_]
    return Block(label, dense, hex_, rejects, 0)

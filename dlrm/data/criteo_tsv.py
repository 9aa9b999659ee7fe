"""Criteo's TSV rows parsed into blocks: label, 13 dense and 26 hex categorical columns.

pyarrow's CSV reader splits the fields (as raw bytes); the column codecs check and convert
them. A block holds a chunk's good rows of one read, transformed, and its rejects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from dlrm.data.chunks import LineReader, Options, Task
from dlrm.data.codecs import column_bytes, dense_column, hex_column, label_column
from dlrm.data.rejects import REJECT_REASONS, REJECT_TEXT_BYTES, Reject
from dlrm.data.schema import DENSE_NAMES, LABEL, SPARSE_NAMES, TSV_COLUMNS

Hex = list[tuple[np.ndarray, np.ndarray]]  # per categorical feature: (uint64 values, present)


@dataclass
class Block:
    """Good rows of one block, parsed and transformed, and the block's rejects."""

    label: np.ndarray  # int8
    dense: list[np.ndarray]  # per dense feature: float32, transformed
    hex: Hex
    rejects: list[Reject]
    lines: int  # lines of the chunk consumed up to the end of this block

    @classmethod
    def empty(cls, rejects: list[Reject], lines: int) -> Block:
        hex_ = [(np.zeros(0, np.uint64), np.zeros(0, bool)) for _ in SPARSE_NAMES]
        dense = [np.zeros(0, np.float32) for _ in DENSE_NAMES]
        return cls(np.zeros(0, np.int8), dense, hex_, rejects, lines)


def read_blocks(task: Task, opts: Options,
                 progress: Callable[[int], None] = lambda n: None) -> Iterator[Block]:
    """Parsed blocks of a chunk; the last one carries the reader's own rejects."""
    reader = LineReader(task, opts, progress)
    for buf in reader.blocks():
        first_line = reader.lines + 1
        arr = np.frombuffer(buf, np.uint8)
        ends = np.flatnonzero(arr == 10)
        starts = np.r_[0, ends[:-1] + 1]
        reader.lines += ends.size
        rejects = reader.rejects
        reader.rejects = []
        lengths = ends - starts
        blank = lengths == 0
        long = lengths > opts.max_line_bytes
        bad_utf8 = np.zeros(ends.size, bool)
        non_ascii = np.zeros(0, np.int64) if buf.isascii() else np.flatnonzero(arr >= 0x80)
        for i in np.unique(np.searchsorted(ends, non_ascii)):
            try:  # Criteo is ASCII: only lines holding other bytes need a look
                buf[starts[i]:ends[i]].decode("utf-8")
            except UnicodeDecodeError:
                bad_utf8[i] = True
        keep = ~(blank | long | bad_utf8)
        for i in np.flatnonzero(~keep):
            reason = "line_too_long" if long[i] else "empty_line" if blank[i] else "invalid_utf8"
            text = buf[starts[i]:min(ends[i], starts[i] + REJECT_TEXT_BYTES)]
            rejects.append(Reject(first_line + int(i), reason, text))
        kept = np.flatnonzero(keep)
        if kept.size < ends.size:
            buf = b"".join(buf[starts[i]:ends[i] + 1] for i in kept)
        if kept.size:
            block = parse(buf, first_line + kept)
            block.rejects = sorted(rejects + block.rejects, key=lambda r: r.line)
            block.lines = reader.lines
            yield block
        else:
            yield Block.empty(rejects, reader.lines)
    if reader.rejects:
        yield Block.empty(reader.rejects, reader.lines)


def parse(buf: bytes, line_of: np.ndarray) -> Block:
    """Splits, checks and converts the fields of ``buf`` (whole lines); rows with problems
    become rejects. ``line_of[k]`` is the line number of the k-th line of ``buf``.

    pyarrow's CSV reader splits the fields (as raw bytes); each column is then checked
    and converted with whole-array numpy operations on the column's bytes and offsets.
    """
    wrong: list[int] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        wrong.append(row.number)
        return "skip"

    table = pacsv.read_csv(
        pa.py_buffer(buf),
        read_options=pacsv.ReadOptions(column_names=TSV_COLUMNS, use_threads=False,
                                       block_size=len(buf) + 1),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False,
                                         ignore_empty_lines=False, invalid_row_handler=on_invalid),
        convert_options=pacsv.ConvertOptions(column_types={c: pa.binary() for c in TSV_COLUMNS}),
    )
    rejects = []
    valid_lines = line_of
    if wrong:
        rows = np.asarray(wrong, dtype=np.int64) - 1  # pyarrow numbers physical rows from 1
        mask = np.ones(line_of.size, bool)
        mask[rows] = False
        lines = buf.split(b"\n")
        rejects += [Reject(int(line_of[r]), "wrong_field_count", lines[r][:REJECT_TEXT_BYTES])
                    for r in rows]
        valid_lines = line_of[mask]

    reason = np.full(table.num_rows, -1, dtype=np.int64)  # first problem of each row

    def mark(ok: np.ndarray, why: str) -> None:
        reason[(reason < 0) & ~ok] = REJECT_REASONS.index(why)

    label, ok = label_column(*column_bytes(table.column(LABEL)))
    mark(ok, "bad_label")
    dense = []
    for c in DENSE_NAMES:
        x, ok = dense_column(table.column(c))
        mark(ok, "bad_dense")
        dense.append(x)
    hex_ = []
    for c in SPARSE_NAMES:
        values, present, ok = hex_column(*column_bytes(table.column(c)))
        mark(ok, "bad_categorical")
        hex_.append((values, present))

    bad = np.flatnonzero(reason >= 0)
    if bad.size:
        texts = join_fields(table.take(bad))
        for i, text in zip(bad, texts, strict=True):
            why = REJECT_REASONS[int(reason[i])]
            rejects.append(Reject(int(valid_lines[i]), why, text[:REJECT_TEXT_BYTES]))
        good = reason < 0
        label, dense = label[good], [x[good] for x in dense]
        hex_ = [(v[good], p[good]) for v, p in hex_]
    return Block(label, dense, hex_, rejects, 0)


def join_fields(table: pa.Table) -> list[bytes]:
    cols = [table.column(c).to_pylist() for c in TSV_COLUMNS]
    return [b"\t".join(fields) for fields in zip(*cols, strict=True)]

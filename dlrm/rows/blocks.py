"""A chunk's lines → blocks of parsed rows, whatever the layout; and a block's rejects.

``read_blocks`` drops the lines that cannot be parsed at all (empty, overlong, not UTF-8)
and hands the rest, a block at a time, to a layout's ``parse``; ``split_fields`` and
``reject_rows`` are the pieces every ``parse`` shares: fields split by pyarrow's CSV
reader as raw bytes, and the rows some column found bad turned into rejects.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from dlrm.rows.chunks import LineReader, Options, Task
from dlrm.rows.rejects import REJECT_REASONS, REJECT_TEXT_BYTES, Reject, one_line
from dlrm.utils.files import atomic_path

# Per categorical feature: (uint64 values, present) for one id per row, or (uint64 values
# of all bags, lengths) for a bag per row.
Hex = list[tuple[np.ndarray, np.ndarray]]


@dataclass
class Block:
    """Good rows of one block, parsed and transformed, and the block's rejects."""

    label: np.ndarray  # int8
    dense: list[np.ndarray]  # per dense feature: float32, transformed
    hex: Hex
    rejects: list[Reject]
    lines: int  # lines of the chunk consumed up to the end of this block
    time: np.ndarray | None = None  # int64 seconds, where the schema has a time column
    unmatched: list[int] | None = None  # per side table: rows whose key it lacks


_DICTIONARY = pa.dictionary(pa.int32(), pa.binary())


def bag_array(values: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    """A bag feature's rows as a list array: ``values`` of all bags, ``lengths`` per row
    (the mask of a bag feature in ``Block.hex``)."""
    offsets = np.zeros(lengths.size + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))

Parse = Callable[[bytes, np.ndarray], Block]  # (whole lines, line numbers) → block
Empty = Callable[[list[Reject], int], Block]  # (rejects, lines) → a block without rows


def read_blocks(task: Task, opts: Options, parse: Parse, empty: Empty,
                progress: Callable[[int], None] = lambda n: None,
                header: bool = False) -> Iterator[Block]:
    """Parsed blocks of a chunk; the last one carries the reader's own rejects. With
    ``header``, the file's first line (in the chunk that starts the file) is skipped."""
    reader = LineReader(task, opts, progress)
    skip = header and task.start == 0
    for buf in reader.blocks():
        if skip:  # the header: counted as line 1, never parsed
            buf, skip = buf[buf.find(b"\n") + 1:], False
            reader.lines += 1
            if not buf:
                continue
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
            try:  # mostly ASCII: only lines holding other bytes need a look
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
            yield empty(rejects, reader.lines)
    if reader.rejects:
        yield empty(reader.rejects, reader.lines)


def split_fields(buf: bytes, line_of: np.ndarray, columns: list[str], delimiter: str,
                 quoted: bool, convert: list[str] | None = None, dictionary: list[str] = (),
                 ) -> tuple[pa.Table, np.ndarray, list[Reject]]:
    """The fields of ``buf`` (whole lines) as binary columns; lines with the wrong number
    of fields become rejects. Returns the table, the line number of each of its rows and
    the rejects. ``convert``: the columns to keep (default all; the others are checked
    for their count only). ``dictionary``: columns read dictionary-encoded (each distinct
    field once, then an index per row): the reader builds it faster than it copies the
    bytes, and a column's values are then converted once per distinct field."""
    wrong: list[int] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        wrong.append(row.number)
        return "skip"

    keep = convert or columns
    table = pacsv.read_csv(
        pa.py_buffer(buf),
        read_options=pacsv.ReadOptions(column_names=columns, use_threads=False,
                                       block_size=len(buf) + 1),
        parse_options=pacsv.ParseOptions(delimiter=delimiter,
                                         quote_char='"' if quoted else False,
                                         ignore_empty_lines=False, invalid_row_handler=on_invalid),
        convert_options=pacsv.ConvertOptions(
            column_types={c: _DICTIONARY if c in dictionary else pa.binary() for c in keep},
            include_columns=keep),
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
    return table, valid_lines, rejects


class RowProblems:
    """The first problem of each row of a table, as its columns are converted."""

    def __init__(self, rows: int) -> None:
        self.reason = np.full(rows, -1, dtype=np.int64)

    def mark(self, ok: np.ndarray, why: str) -> None:
        self.reason[(self.reason < 0) & ~ok] = REJECT_REASONS.index(why)

    def good(self) -> np.ndarray | None:
        """The rows without a problem; None when every row is good."""
        return self.reason < 0 if (self.reason >= 0).any() else None

    def rejects_of_table(self, table: pa.Table, lines: np.ndarray) -> list[Reject]:
        """The bad rows with their text: their fields (binary) joined by commas."""
        bad = np.flatnonzero(self.reason >= 0)
        if not bad.size:
            return []
        picked = table.take(bad)
        cols = [[str(v).encode() if not isinstance(v, bytes) else v
                 for v in picked.column(c).to_pylist()] for c in picked.column_names]
        return [Reject(int(lines[i]), REJECT_REASONS[int(self.reason[i])],
                       b",".join(fields)[:REJECT_TEXT_BYTES])
                for i, fields in zip(bad, zip(*cols, strict=True), strict=True)]

    def rejects(self, buf: bytes, line_of: np.ndarray, lines: np.ndarray) -> list[Reject]:
        """The bad rows with their text: the row of line ``lines[i]`` is the line of
        ``buf`` whose number ``line_of`` gives."""
        bad = np.flatnonzero(self.reason >= 0)
        if not bad.size:
            return []
        texts = buf.split(b"\n")
        where = np.searchsorted(line_of, lines[bad])
        return [Reject(int(lines[i]), REJECT_REASONS[int(self.reason[i])],
                       texts[k].removesuffix(b"\r")[:REJECT_TEXT_BYTES])
                for i, k in zip(bad, where, strict=True)]


def with_rejects(blocks: Iterator[Block], path: Path, summary: dict[str, Any]) -> Iterator[Block]:
    """Passes ``blocks`` through, writing their rejects to ``path`` (atomically, once all
    are read); then fills ``summary`` with ``lines``, ``rejected_by_reason`` and, with side
    tables, ``unmatched`` (per table, the rows whose key it lacks)."""
    reasons: Counter[str] = Counter()
    lines, unmatched = 0, None
    with atomic_path(path) as tmp, open(tmp, "wb") as rejects:
        for block in blocks:
            lines = block.lines
            if block.unmatched is not None:
                unmatched = [a + b for a, b in zip(unmatched or [0] * len(block.unmatched),
                                                   block.unmatched, strict=True)]
            for r in block.rejects:
                reasons[r.reason] += 1
                rejects.write(b"%d\t%s\t%s\n" % (r.line, r.reason.encode(), one_line(r.text)))
            yield block
    summary.update(lines=lines, rejected_by_reason=dict(sorted(reasons.items())),
                   **({"unmatched": unmatched} if unmatched is not None else {}))

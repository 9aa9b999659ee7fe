"""Rows of a declared schema (CSV or TSV text) parsed into blocks.

Fields are split by pyarrow's CSV reader (quoted fields in CSV) as raw bytes; each
column goes through the codec its declaration names. A row with a wrong number of
fields, a label or number that does not parse, or a bag longer than its cap is rejected
by reason with its line; the good rows around it are kept.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dlrm.errors import PreprocessError
from dlrm.rows.blocks import Block, RowProblems, read_blocks, split_fields
from dlrm.rows.chunks import Options, Task
from dlrm.rows.codecs import (
    bag_values,
    category_values,
    column_bytes,
    label_column,
    number_column,
    transform,
)
from dlrm.rows.joins import apply_joins
from dlrm.rows.rejects import Reject
from dlrm.schema.declared import Schema, parse_rule
from dlrm.schema.periods import parse_times

_COMPARE = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
            ">": operator.gt, "<": operator.lt}


def declared_blocks(task: Task, opts: Options, schema: Schema,
                    progress: Callable[[int], None] = lambda n: None) -> Iterator[Block]:
    """Parsed blocks of a chunk of ``schema``'s text (its ``columns`` filled in)."""
    return read_blocks(task, opts, functools.partial(parse, schema=schema),
                       functools.partial(empty, schema=schema), progress, header=schema.header)


def empty(rejects: list[Reject], lines: int, schema: Schema) -> Block:
    """A block of no rows (only rejects)."""
    none = np.zeros(0, np.uint64)
    hex_ = [(none, np.zeros(0, np.int32 if c.multi else bool)) for c in schema.categorical]
    label = np.zeros(0, np.float32 if schema.kind == "regression" else np.int8)
    return Block(label, [np.zeros(0, np.float32) for _ in schema.dense], hex_, rejects, lines,
                 np.zeros(0, np.int64) if schema.time else None)


def _label(column, schema: Schema) -> tuple[np.ndarray, np.ndarray]:
    """(labels, valid): binary (int8) where the field is exactly 0 or 1, or the rule holds
    of its number; regression (float32) the number itself."""
    if schema.kind == "regression":
        values, ok = number_column(column, np.nan, integer=False)
        ok &= ~np.isnan(values)  # an empty label is no label
        return values.astype(np.float32), ok
    parsed = parse_rule(schema.rule)
    if parsed is None:
        return label_column(*column_bytes(column))
    op, threshold = parsed
    values, ok = number_column(column, np.nan, integer=False)
    ok &= ~np.isnan(values)  # an empty label is no label
    return _COMPARE[op](values, threshold).astype(np.int8), ok


def parse(buf: bytes, line_of: np.ndarray, schema: Schema) -> Block:
    """Splits, checks and converts the fields of ``buf`` (whole lines) by ``schema``."""
    table, lines, rejects = split_fields(
        buf, line_of, list(schema.columns), schema.delimiter, quoted=schema.format == "csv",
        convert=schema.used(), dictionary=[c.name for c in schema.categorical if not c.multi])
    block, problems = convert(table, schema)
    block.rejects = rejects + problems.rejects(buf, line_of, lines)
    return block


def parquet_blocks(task: Task, opts: Options, schema: Schema,
                   progress: Callable[[int], None] = lambda n: None) -> Iterator[Block]:
    """Blocks of a Parquet file (a whole file is one chunk); a reject's line is its row
    number in the file (from 1) and its text the row's fields joined by commas."""
    path = Path(task.path)
    try:
        file = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise PreprocessError(f"{path}: not a readable Parquet file: {e}") from None
    with file:
        rows = 0
        for batch in file.iter_batches(batch_size=1 << 16, columns=schema.used(),
                                       use_threads=False):
            table = pa.Table.from_batches([batch])
            lines = np.arange(rows + 1, rows + table.num_rows + 1)
            rows += table.num_rows
            block, problems = convert(_as_text(table), schema)
            block.rejects = problems.rejects_of_table(_as_text(table), lines)
            block.lines = rows
            yield block
    progress(task.bytes)


def _as_text(table: pa.Table) -> pa.Table:
    """Typed Parquet columns as the codecs read them: binary text (booleans as 0 / 1),
    list, timestamp and date columns as they are."""
    columns = []
    for column in table.columns:
        t = column.type
        if (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_timestamp(t)
                or pa.types.is_date(t)):
            columns.append(column)
            continue
        if pa.types.is_boolean(t):
            column = pc.cast(column, pa.int8())
        columns.append(pc.cast(pc.cast(column, pa.string()), pa.binary()))
    return pa.table(columns, names=table.column_names)


def convert(table: pa.Table, schema: Schema) -> tuple[Block, RowProblems]:
    """The good rows of ``table`` (binary fields, or list columns for bags) converted by
    ``schema``, and the problems of the others (the caller makes their rejects)."""
    unmatched = None
    if schema.joins:
        table, unmatched = apply_joins(table, schema.joins)
    problems = RowProblems(table.num_rows)
    if schema.labeled:
        label, ok = _label(table.column(schema.label), schema)
        problems.mark(ok, "bad_label")
    else:  # rows to score: a label of 0 that nothing reads
        label = np.zeros(table.num_rows, np.float32 if schema.kind == "regression" else np.int8)
    dense = []
    numbers = _by_group(table, [(d.name, (d.fill, d.values == "integer")) for d in schema.dense],
                        lambda column, key: number_column(column, *key))
    for d, (values, ok) in zip(schema.dense, numbers, strict=True):
        problems.mark(ok, "bad_dense")
        dense.append(transform(values, d.transform))
    single = _by_group(table, [(c.name, c.values) for c in schema.categorical if not c.multi],
                       category_values)
    hex_ = []
    for c in schema.categorical:
        if c.multi:
            values, lengths, ok, short = bag_values(table.column(c.name), c.separator, c.values,
                                                    c.max_length)
            problems.mark(ok, "bad_categorical")
            problems.mark(short, "list_too_long")
            hex_.append((values, lengths))
        else:
            values, present, ok = single.pop(0)
            problems.mark(ok, "bad_categorical")
            hex_.append((values, present))
    time = None
    if schema.time:
        time, ok = parse_times(table.column(schema.time.column), schema.time.format)
        problems.mark(ok, "bad_time")
    good = problems.good()
    if good is not None:
        label, dense = label[good], [x[good] for x in dense]
        hex_ = [(v[np.repeat(good, m)], m[good]) if c.multi else (v[good], m[good])
                for c, (v, m) in zip(schema.categorical, hex_, strict=True)]
        time = None if time is None else time[good]
    misses = None if unmatched is None else [
        int(m.sum() if good is None else m[good].sum()) for m in unmatched]
    return Block(label, dense, hex_, [], 0, time, misses), problems


GROUP_ROWS = 1024  # tables up to this many rows convert alike columns as one


def _by_group(table: pa.Table, columns: list[tuple[str, Any]],
              fn: Callable[[pa.ChunkedArray, Any], tuple[np.ndarray, ...]],
              ) -> list[tuple[np.ndarray, ...]]:
    """``fn(column, key)`` of each ``(name, key)`` in order. A small table (a request's
    rows: its cost is then per call, not per row) converts the columns of one key as one
    column, their fields end to end, and splits the results: every converter is
    elementwise, so they are the same."""
    n = table.num_rows
    if n > GROUP_ROWS:
        return [fn(table.column(name), key) for name, key in columns]
    groups: dict[Any, list[int]] = {}
    for i, (name, key) in enumerate(columns):  # a dictionary column's own dictionary
        alone = pa.types.is_dictionary(table.column(name).type)
        groups.setdefault((key, name) if alone else (key,), []).append(i)
    out: list[tuple[np.ndarray, ...]] = [()] * len(columns)
    for key, members in groups.items():
        joined = pa.chunked_array([chunk for i in members
                                   for chunk in table.column(columns[i][0]).chunks],
                                  table.column(columns[members[0]][0]).type)
        results = fn(joined, key[0])
        for k, i in enumerate(members):
            out[i] = tuple(r[k * n:(k + 1) * n] for r in results)
    return out

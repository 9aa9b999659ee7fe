"""Joining a schema's side tables (``dlrm.schema.joins``) onto rows read as binary text: each
table read once per process (cached by its path, size and time), keys matched as text,
surrounding spaces trimmed; a key twice in a table is an error naming the file and line."""

from __future__ import annotations

import csv
import functools
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dlrm.schema.joins import Join, JoinError


def _text(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A column as trimmed binary text (a Parquet column of any type; null: empty)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    t = column.type
    if pa.types.is_boolean(t):
        column = pc.cast(column, pa.int8())
    try:
        column = pc.utf8_trim_whitespace(pc.cast(column, pa.string()))
    except pa.ArrowInvalid:  # not UTF-8: matched as the bytes it is
        pass
    return pc.fill_null(pc.cast(column, pa.binary()), b"")


@functools.lru_cache(maxsize=16)
def _load(join: Join, size: int, mtime_ns: int) -> tuple[pa.Array, dict[str, pa.Array]]:
    """(keys, the joined columns) of a table, every field as binary text."""
    path = Path(join.file)
    try:
        if join.format == "parquet":
            table = pq.read_table(path)
        else:
            names = list(join.names)
            if join.header:
                with open(path, newline="", encoding="utf-8", errors="replace") as f:
                    first = f.readline().lstrip("\ufeff")
                names = next(csv.reader(io.StringIO(first), delimiter=join.delimiter))
            table = pacsv.read_csv(
                path, read_options=pacsv.ReadOptions(column_names=names,
                                                     skip_rows=1 if join.header else 0),
                parse_options=pacsv.ParseOptions(delimiter=join.delimiter,
                                                  quote_char='"' if join.format == "csv"
                                                  else False),
                convert_options=pacsv.ConvertOptions(
                    column_types={n: pa.binary() for n in names}, strings_can_be_null=False))
    except (OSError, pa.ArrowException, StopIteration) as e:
        raise JoinError(f"{path}: not a readable {join.format} table: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    missing = [c for c in (join.key, *join.columns) if c not in table.column_names]
    if missing:
        raise JoinError(f"{path}: no column {', '.join(missing)} (it has "
                        f"{', '.join(table.column_names)})")
    keys = _text(table.column(join.key))
    counts = pc.value_counts(keys)
    twice = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(twice):
        value = twice[0]["values"].as_py()
        rows = np.flatnonzero(pc.equal(keys, pa.scalar(value, pa.binary()))
                              .to_numpy(zero_copy_only=False))
        line = (lambda r: r + 1 + join.header) if join.format != "parquet" else (lambda r: r + 1)
        what = "line" if join.format != "parquet" else "row"
        raise JoinError(f"{path}: {what} {line(int(rows[1]))}: key {join.key} = "
                        f"{value.decode(errors='replace')!r} again (first at {what} "
                        f"{line(int(rows[0]))}); a side table holds each key once")
    return keys, {c: _text(table.column(c)) for c in join.columns}


def table_of(join: Join) -> tuple[pa.Array, dict[str, pa.Array]]:
    st = Path(join.file).stat() if Path(join.file).exists() else None
    if st is None:
        raise JoinError(f"{join.file}: side table not found (schema [[join]] on {join.key})")
    return _load(join, st.st_size, st.st_mtime_ns)


def apply_joins(table: pa.Table, joins: tuple[Join, ...]) -> tuple[pa.Table, list[np.ndarray]]:
    """``table`` (binary fields) with each join's columns added, matched by key; and per
    join which rows' keys the table lacks (their joined fields empty: missing)."""
    unmatched = []
    for join in joins:
        keys, columns = table_of(join)
        where = pc.index_in(_text(table.column(join.key)), value_set=keys)
        unmatched.append(pc.is_null(where).to_numpy(zero_copy_only=False))
        for name, column in columns.items():
            table = table.append_column(name, pc.fill_null(column.take(where), b""))
    return table, unmatched

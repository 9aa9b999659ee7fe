"""Side tables joined onto each row by key (a schema's ``[[join]]``): a user table, an item
table, so that a log and its tables go in as they are::

    [[join]]
    file = "users.csv"        # relative to the schema file's folder; csv, tsv or parquet
    key = "user_id"           # a column of the rows and of the table
    columns = ["gender", "age", "occupation", "zip"]   # the table's columns to join
    # format = "csv"          # default: by the file's suffix
    # delimiter = "|"         # default: "," for csv, tab for tsv
    # header = false          # then name every column of a line:
    # names = ["user_id", "gender", "age", "occupation", "zip"]

The joined columns are then declared as features like any other. A row whose key the table
lacks gets missing values for the table's columns (counted in the manifest); a key twice
in a table is an error naming the file and the line. Keys match as text, surrounding
spaces trimmed. Each process reads a table once (cached by its path, size and time).
"""

from __future__ import annotations

import csv
import functools
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dlrm.data.chunks import PreprocessError

JOIN_FORMATS = ("csv", "tsv", "parquet")


class JoinError(PreprocessError):
    """A side table that cannot be joined; names the file, and the line where one is at
    fault."""


@dataclass(frozen=True)
class Join:
    file: str  # absolute; a model directory's own is relative to it (see ``based``)
    key: str
    columns: tuple[str, ...]
    format: str = "csv"
    delimiter: str = ","
    header: bool = True
    names: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Join:
        return cls(**{**doc, "columns": tuple(doc["columns"]), "names": tuple(doc["names"])})


def parse_joins(entries: Any, where: str, base: Path) -> tuple[Join, ...]:
    """The ``[[join]]`` tables of a schema file (``base``: its folder)."""
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise JoinError(f"{where}: join: expected [[join]] tables")
    joins = []
    for i, entry in enumerate(entries):
        at = f"{where}: join[{i}]"
        e = dict(entry)
        unknown = [k for k in e if k not in ("file", "key", "columns", "format", "delimiter",
                                             "header", "names")]
        if unknown:
            raise JoinError(f"{at}: unknown key {', '.join(unknown)}")
        for key in ("file", "key"):
            if not isinstance(e.get(key), str) or not e[key]:
                raise JoinError(f"{at}.{key}: required, a string")
        columns, names = e.get("columns", []), e.get("names", [])
        for key, value in (("columns", columns), ("names", names)):
            if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
                raise JoinError(f"{at}.{key}: expected a list of column names")
        if not columns:
            raise JoinError(f"{at}.columns: name the table's columns to join")
        if e["key"] in columns:
            raise JoinError(f"{at}.columns: {e['key']} is the key")
        path = Path(e["file"]).expanduser()
        path = path if path.is_absolute() else (base / path)
        fmt = e.get("format") or ("parquet" if path.suffix == ".parquet" else
                                  "tsv" if path.suffix in (".tsv", ".txt") else "csv")
        if fmt not in JOIN_FORMATS:
            raise JoinError(f"{at}.format: must be one of {', '.join(JOIN_FORMATS)}, got {fmt!r}")
        delimiter = e.get("delimiter") or ("\t" if fmt == "tsv" else ",")
        header = e.get("header", True)
        if not isinstance(header, bool) or len(delimiter) != 1:
            raise JoinError(f"{at}: header must be true or false, delimiter one character")
        if not header and fmt != "parquet" and not names:
            raise JoinError(f"{at}.names: required without a header")
        joins.append(Join(str(path.resolve()), e["key"], tuple(columns), fmt, delimiter, header,
                          tuple(names)))
    seen: list[str] = []
    for j in joins:
        twice = [c for c in j.columns if c in seen]
        if twice:
            raise JoinError(f"{where}: join: {', '.join(twice)} joined from two tables")
        seen += j.columns
    return tuple(joins)


def based(joins: tuple[Join, ...], base: Path) -> tuple[Join, ...]:
    """Joins whose relative files (a model directory's) are taken under ``base``."""
    return tuple(j if Path(j.file).is_absolute() else
                 Join(**{**j.__dict__, "file": str(base / j.file)}) for j in joins)


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

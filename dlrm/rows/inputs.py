"""The inputs of a preprocessing (or prediction) run: their checks, a header's columns, and
the layout the workers read them by."""

from __future__ import annotations

import csv
import dataclasses
import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dlrm.errors import PreprocessError, SchemaError
from dlrm.rows.chunks import source_name
from dlrm.rows.layout import Layout
from dlrm.rows.vocab import Encoding
from dlrm.schema.declared import Schema


def check_inputs(paths: list[Path], encoding: Encoding) -> None:
    if not paths:
        raise PreprocessError("no input files given")
    for p in paths:
        if not p.is_file():
            raise PreprocessError(f"input not found or not a file: {p}")
        try:
            with open(p, "rb") as f:
                f.read(1)
        except OSError as e:
            raise PreprocessError(f"input not readable: {p}: {e.strerror}") from None
    names = [source_name(p) for p in paths]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PreprocessError(f"inputs share source names {dupes}: rename them")
    if encoding is None:
        return
    if encoding.type not in ("vocab", "hash"):
        raise PreprocessError(f"unknown encoding {encoding.type!r} (vocab or hash)")
    if encoding.type == "hash" and encoding.buckets < 2:
        raise PreprocessError(f"hash buckets must be >= 2, got {encoding.buckets}")


def read_header(path: Path, delimiter: str) -> list[str]:
    """The column names on the first line of ``path`` (plain or gzip)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            line = f.readline(1 << 20)
    except (OSError, EOFError) as e:
        raise PreprocessError(f"{path}: cannot read its header line: {e}") from None
    text = line.decode("utf-8-sig", "replace").rstrip("\r\n")  # a BOM is no name
    return next(csv.reader([text], delimiter=delimiter)) if text else []


def with_encoding(schema: Schema, encoding: Encoding) -> Schema:
    """``schema`` with ``encoding`` as every categorical feature's."""
    return dataclasses.replace(schema, categorical=tuple(
        dataclasses.replace(c, encoding=encoding.type, min_frequency=encoding.min_frequency,
                            max_vocab=encoding.max_vocab, buckets=encoding.buckets)
        for c in schema.categorical))


def layout_of(schema: Schema, encoding: Encoding | None, paths: list[Path],
              same_columns: bool = True) -> Layout:
    """The workers' layout of ``schema`` for ``paths`` (Criteo's fast path where the schema
    is Criteo's exact layout: ``Schema.criteo_tsv``); ``encoding``, when given, replaces
    every categorical feature's (``with_encoding``). A header
    names the columns: every file's must be the same and hold what the schema declares;
    with ``same_columns`` (preprocessing, where a dataset's files are one layout) exactly
    the schema's ``input.columns``, else (rows to score) in any order, ignored ones
    optional."""
    if encoding is not None:
        schema = with_encoding(schema, encoding)
    if schema.format == "parquet":
        for p in paths:
            try:
                names = pq.read_schema(p).names
            except (OSError, pa.ArrowException) as e:
                raise PreprocessError(f"{p}: not a readable Parquet file: {e}") from None
            try:
                schema.check_columns(names, str(p))
            except SchemaError as e:
                raise PreprocessError(str(e)) from None
    elif schema.header and paths:  # no paths: rows that come by other means (serving)
        headers = {p: read_header(p, schema.delimiter) for p in paths}
        columns = headers[paths[0]]
        for p, names in headers.items():
            if names != columns:
                raise PreprocessError(f"{p}: header {names} differs from {paths[0]}'s {columns}")
            if same_columns and schema.columns and names != list(schema.columns):
                raise PreprocessError(f"{p}: header {names} is not the schema's input.columns "
                                      f"{list(schema.columns)}")
        try:
            schema.check_columns(columns, f"{paths[0]}: header")
        except SchemaError as e:
            raise PreprocessError(str(e)) from None
        schema = dataclasses.replace(schema, columns=tuple(columns))
    return Layout.declared(schema)

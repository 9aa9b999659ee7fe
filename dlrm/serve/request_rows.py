"""Raw rows given as JSON (objects keyed by column name, or lists in the input's column
order) → a block of parsed rows, through the same column converters as a file's rows.

Each value becomes the text a file would hold (a number as written, ``null`` as an empty
field, a list as its items joined by the feature's separator) and the columns are
converted by ``declared_reader.convert`` with the training dataset's schema (Criteo's
declared in ``configs/schemas/criteo.toml``). The label may be left out (it is not
scored), and so may the time column and ignored columns. Anything else wrong names the
row and the field: ``RowsError``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pyarrow as pa

from dlrm.rows.blocks import Block
from dlrm.rows.declared_reader import convert
from dlrm.rows.rejects import REJECT_REASONS
from dlrm.schema.declared import Schema

FEW_ROWS = 32  # a request of up to this many rows is read value by value, not by column
Fields = dict[str, list[bytes] | pa.Array]  # a request's fields, by column


class RowsError(ValueError):
    """A request's rows that cannot be scored; the message names the row and the field."""


class RequestRows:
    """The columns a row may hold, and their conversion, for one schema."""

    def __init__(self, schema: Schema) -> None:
        self.schema = dataclasses.replace(schema, time=None)  # not a feature
        self.columns = list(schema.columns) or [*schema.used(), *schema.ignore]
        self.optional = {schema.label, *schema.ignore,
                         *([schema.time.column] if schema.time else [])}
        self.required = [c for c in self.columns if c not in self.optional]
        self.separator = {c.name: c.separator for c in schema.categorical if c.multi}
        self.categorical = {c.name for c in schema.categorical}

    def block(self, rows: Any) -> Block:
        """The rows' block (every row good) or RowsError."""
        block, reasons = self.convert(self.fields(rows))
        self.check(reasons)
        return block

    def fields(self, rows: Any) -> Fields:
        """Each column's fields of the rows, as text (RowsError naming the row and field
        of the first that has no such text): a list of bytes for a request of up to
        ``FEW_ROWS`` rows; a larger one of lists of strings, as most rows come, as binary
        arrays made column by column (in pyarrow: no Python per value)."""
        if not isinstance(rows, list) or not rows:
            raise RowsError("rows: expected a non-empty list of rows")
        if len(rows) > FEW_ROWS:
            columns = self._columns(rows)
            if columns is not None:
                return columns
        texts = [self._texts(i, row) for i, row in enumerate(rows)]
        return dict(zip(self.columns, map(list, zip(*texts, strict=True)), strict=True))

    def _columns(self, rows: list[Any]) -> dict[str, pa.Array] | None:
        """Rows that are all lists of every column's string, as binary columns; None
        for any others (then read row by row, which names what is wrong)."""
        width = len(self.columns)
        if not all(type(row) is list and len(row) == width for row in rows):
            return None
        try:  # str as UTF-8 bytes; a null (None) counts as no string
            columns = {c: pa.array(values, pa.binary())
                       for c, values in zip(self.columns, zip(*rows, strict=True), strict=True)}
        except (pa.ArrowException, TypeError, ValueError):  # no string, or no Unicode
            return None
        return None if any(a.null_count for a in columns.values()) else columns

    def _texts(self, i: int, row: Any) -> list[bytes]:
        """Row ``i``'s fields in column order: a list of strings as they are, anything
        else value by value."""
        if type(row) is list and len(row) == len(self.columns):
            try:
                return [v.encode() for v in row]
            except (AttributeError, UnicodeEncodeError):  # a value that is no string
                pass
        named = self._named(i, row)
        return [b"0" if c == self.schema.label and named.get(c) is None  # not scored
                else self.text(i, c, named.get(c)) for c in self.columns]

    def convert(self, *requests: Fields) -> tuple[Block, np.ndarray]:
        """The good rows of the requests' fields (together, in one pass) as a block, and
        each row's problem (a reject reason's index; -1: none)."""
        table = pa.table({c: pa.chunked_array([r[c] if isinstance(r[c], pa.Array)
                                               else pa.array(r[c], pa.binary())
                                               for r in requests], pa.binary())
                          for c in self.schema.used()})
        block, problems = convert(table, self.schema)
        return block, problems.reason

    @staticmethod
    def check(reasons: np.ndarray) -> None:
        """RowsError naming the first rows that have a problem, if any has."""
        bad = np.flatnonzero(reasons >= 0)
        if bad.size:
            shown = "; ".join(f"row {i}: {REJECT_REASONS[int(reasons[i])]}" for i in bad[:5])
            raise RowsError(f"{bad.size} row(s) cannot be read: {shown}")

    def _named(self, i: int, row: Any) -> dict[str, Any]:
        """Row ``i`` as its values by column name (RowsError if it has the wrong shape)."""
        if isinstance(row, dict):
            extra = [k for k in row if k not in self.columns]
            if extra:
                raise RowsError(f"row {i}: unknown field(s) {', '.join(map(str, extra[:5]))}")
            missing = [c for c in self.required if c not in row]
            if missing:
                raise RowsError(f"row {i}: missing field(s) {', '.join(missing[:5])} "
                                "(give null for a missing value)")
            named = row
        elif isinstance(row, list):
            full, unlabeled = len(self.columns), len(self.columns) - 1
            if len(row) == full:
                named = dict(zip(self.columns, row, strict=True))
            elif len(row) == unlabeled:
                named = dict(zip([c for c in self.columns if c != self.schema.label], row,
                                 strict=True))
            else:
                raise RowsError(f"row {i}: {len(row)} values, expected {full} (the columns "
                                f"{', '.join(self.columns)}) or {unlabeled} without the label")
        else:
            raise RowsError(f"row {i}: expected an object or a list, got "
                            f"{type(row).__name__}")
        return named

    def text(self, i: int, column: str, value: Any) -> bytes:
        if value is None:
            return b""
        if isinstance(value, bool):
            raise RowsError(f"row {i}, field {column}: expected a number or a string, "
                            "got a boolean")
        if isinstance(value, int):
            if column in self.categorical and not -2**63 <= value < 2**64:
                raise RowsError(f"row {i}, field {column}: {value} is no 64-bit id")
            return str(value).encode()
        if isinstance(value, float):
            if not math.isfinite(value):
                raise RowsError(f"row {i}, field {column}: not a finite number")
            if column in self.categorical and not (value.is_integer() and abs(value) < 2**53):
                raise RowsError(f"row {i}, field {column}: {value!r} is no integer id (a "
                                "categorical value is an integer or a string)")
            return (str(int(value)) if value.is_integer() and abs(value) < 2**53
                    else repr(value)).encode()
        if isinstance(value, str):
            try:
                return value.encode()
            except UnicodeEncodeError:
                raise RowsError(f"row {i}, field {column}: not Unicode text (a lone "
                                "surrogate)") from None
        if isinstance(value, list) and column in self.separator:
            items = [self.text(i, column, v) for v in value]
            return self.separator[column].encode().join(items)
        raise RowsError(f"row {i}, field {column}: expected a number or a string"
                        + (" or a list" if column in self.separator else "")
                        + f", got {type(value).__name__}")

"""A few requests' fields → the rows the model reads, value by value: the fast path of a
small batch.

The vectorised path (``RequestRows.convert``, ``encode``, ``table_rows``) makes tens of
numpy and pyarrow calls per column, about 2 ms whatever the number of rows; a batch of a
few rows costs far less converted value by value. This path takes exactly the values the
vectorised one takes and gives them the same ids and dense values (compared in
``tests/test_scalar_rows.py``). A value it does not take (one the vectorised path may
reject) makes it give up on the batch, which then takes the vectorised path, and that
names each bad row's reason. Rows with side tables to join always take the vectorised
path.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa

from dlrm.data.batches import Rows, standardize
from dlrm.rows.codecs import text_values, transform
from dlrm.rows.vocab import Encoder
from dlrm.schema.features import Features
from dlrm.serve.predict import Scorer
from dlrm.serve.request_rows import FEW_ROWS, RequestRows

MAX_ROWS = FEW_ROWS  # batches of up to this many rows take this path (its cost equals the
# vectorised path's at about 64 Criteo rows, 3.5-4 ms; a batch this path takes is scored on
# the event loop, which it holds meanwhile)

# The codecs' rules for a field's text, as whole-field matches (``codecs.py``):
_INTEGER = re.compile(rb"-?[0-9]{1,18}")  # _decimal: an optional minus, 1 to 18 digits
_FLOAT = re.compile(rb"[\t\n\f\r ]*[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?"
                    rb"[\t\n\f\r ]*")  # number_column's RE2 pattern (RE2's \s, \d)
_HEX = re.compile(rb"[0-9a-fA-F]{1,16}")  # hex_column
_OWN_INTEGER = re.compile(rb"0|-?[1-9][0-9]{0,17}")  # category_values: stands for itself
_U64 = (1 << 64) - 1


class _GiveUp(Exception):
    """A value this path does not take: the batch takes the vectorised path."""


class ScalarRows:
    """``rows(fields)``: the model's rows of a few rows' fields, or None (give up)."""

    def __init__(self, rows: RequestRows, encoder: Encoder, features: Features) -> None:
        schema = rows.schema
        self.encoder, self.features = encoder, features
        self.label = schema.label if schema.labeled else None
        self.label_number = schema.kind == "regression" or bool(schema.rule.strip())
        by_name = {d.name: d for d in schema.dense}
        self.dense = [(name, by_name[name].fill, by_name[name].values == "integer")
                      for name in features.dense]
        self.transforms: dict[str, list[int]] = {}  # transform → its columns
        for j, name in enumerate(features.dense):
            self.transforms.setdefault(by_name[name].transform, []).append(j)
        index = {c.name: f for f, c in enumerate(schema.categorical)}  # the encoder's
        self.sparse = [(name, index[name], schema.categorical[index[name]])
                       for name in features.sparse]

    @classmethod
    def of(cls, rows: RequestRows, scorer: Scorer) -> ScalarRows | None:
        """The fast path of a model's requests; None where it has none (side tables)."""
        return None if rows.schema.joins else cls(rows, scorer.encoder, scorer.features)

    def rows(self, fields: dict[str, list[bytes]]) -> Rows | None:
        try:
            return self._rows(fields)
        except _GiveUp:
            return None

    def _rows(self, fields: dict[str, list[bytes]]) -> Rows:
        n = len(next(iter(fields.values())))
        if self.label is not None:
            for v in fields[self.label]:
                if not (_FLOAT.fullmatch(v) if self.label_number else v in (b"0", b"1")):
                    raise _GiveUp
        values = np.array([[_number(v, fill, integer) for v in fields[name]]
                           for name, fill, integer in self.dense], np.float64).reshape(-1, n)
        dense = np.empty((n, len(self.dense)), np.float32)
        for kind, columns in self.transforms.items():
            dense[:, columns] = transform(values[columns], kind).T
        standardize(dense, self.features)
        sparse = [self._bags(fields[name], f, c.separator.encode(), c.values, c.max_length)
                  if c.multi else self._ids(fields[name], f, c.values)
                  for name, f, c in self.sparse]
        return Rows(np.zeros(n, np.float32), dense, sparse)

    def _ids(self, column: list[bytes], f: int, kind: str) -> np.ndarray:
        values = [_value(v, kind) if v else None for v in column]
        _hash_texts(values)
        missing = self.encoder.missing_id(f)
        return np.array([missing if v is None else self.encoder.id_of(f, v)
                         for v in values], np.int64)

    def _bags(self, column: list[bytes], f: int, separator: bytes, kind: str,
              max_length: int) -> pa.ListArray:
        bags = [[_value(e, kind) for e in v.split(separator) if e] for v in column]
        if max_length and any(len(b) > max_length for b in bags):
            raise _GiveUp
        flat = [e for b in bags for e in b]
        _hash_texts(flat)
        offsets = np.zeros(len(bags) + 1, np.int32)
        np.cumsum([len(b) for b in bags], out=offsets[1:])
        ids = np.array([self.encoder.id_of(f, v) for v in flat], np.int64)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids))


def _number(v: bytes, fill: float, integer: bool) -> float:
    if not v:
        return fill
    if integer:
        if not _INTEGER.fullmatch(v):
            raise _GiveUp
        return float(int(v))
    if not _FLOAT.fullmatch(v):
        raise _GiveUp
    return float(v)


def _value(v: bytes, kind: str) -> int | bytes:
    """A non-empty field's categorical value; text (bytes) where it is to be hashed."""
    if kind == "hex":
        if not _HEX.fullmatch(v):
            raise _GiveUp
        return int(v, 16)
    return int(v) & _U64 if _OWN_INTEGER.fullmatch(v) else v


def _hash_texts(values: list) -> None:
    """Replaces, in place, each text of ``values`` by its hashed value (one call)."""
    texts = [k for k, v in enumerate(values) if isinstance(v, bytes)]
    if texts:
        for k, h in zip(texts, text_values([values[k] for k in texts]).tolist(), strict=True):
            values[k] = h

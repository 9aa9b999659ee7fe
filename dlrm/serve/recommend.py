"""Top-K items for a user (``dlrm recommend``, ``POST /recommend``), for a schema whose
``[roles]`` name the user's and the item's features.

The user's fields are encoded once, as a row with nothing else in it; every candidate
item's fields are put beside them (the other features as that row has them: missing) and
the whole set is scored in batches. Candidates are rows of item fields (a file, or the
request's), or by default every distinct item of the training data, which the export
keeps (``items.parquet``: each item's encoded features as first seen, and its key: the
item key's value, an integer key as itself, a text key as its 64-bit hash).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from dlrm.rows.codecs import category_values
from dlrm.schema.integrity import read_table
from dlrm.serve.model_dir import ITEMS, KEY
from dlrm.serve.predict import Scorer
from dlrm.serve.request_rows import RequestRows, RowsError


class Recommender:
    """Scores candidate items for one user at a time."""

    def __init__(self, scorer: Scorer, rows: RequestRows) -> None:
        schema = rows.schema
        if not schema.item:
            raise RowsError(f"schema {schema.name} names no item features ([roles] item): "
                            "nothing to recommend")
        self.scorer, self.rows, self.schema = scorer, rows, schema
        path = scorer.exported.path / ITEMS
        self.items = read_table(path) if path.is_file() else None

    def _row(self, fields: dict[str, Any], allowed: tuple[str, ...], what: str) -> dict:
        if not isinstance(fields, dict):
            raise RowsError(f"{what}: expected an object of {', '.join(allowed)}")
        unknown = [k for k in fields if k not in allowed]
        if unknown:
            raise RowsError(f"{what}: {', '.join(map(str, unknown))} is not one of its "
                            f"features ({', '.join(allowed)})")
        missing = [c for c in allowed if c in self.rows.required and c not in fields]
        if missing:  # as /predict: a missing value is said, with null
            raise RowsError(f"{what}: missing field(s) {', '.join(missing)} (give null for "
                            "a missing value)")
        return {c: fields.get(c) for c in self.rows.columns
                if c not in self.rows.optional or c in fields}

    def candidates(self, rows: list[dict] | None) -> tuple[pa.Table, list[str]]:
        """The candidates' encoded item columns and their keys."""
        if rows is None:
            if self.items is None:
                raise RowsError("no candidates given and the model keeps none")
            return self.items.select(list(self.schema.item)), self.items.column(KEY).to_pylist()
        if not isinstance(rows, list) or not rows:
            raise RowsError("candidates: expected a non-empty list of item objects")
        full = [self._row(r, self.schema.item, f"candidates[{i}]") for i, r in enumerate(rows)]
        table = self.scorer.encode(self.rows.block(full))
        return (table.select(list(self.schema.item)), [r.get(self.schema.item[0]) for r in rows])

    def recommend(self, user: dict, top_k: int, candidates: list[dict] | None = None,
                  exclude: list[Any] | None = None) -> list[dict[str, Any]]:
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            raise RowsError(f"top_k: expected a positive integer, got {top_k!r}")
        base = self.scorer.encode(self.rows.block([self._row(user, self.schema.user, "user")]))
        items, keys = self.candidates(candidates)
        _, scores = self.scorer.score_table(user_with_items(base, items, self.schema.item))
        seen = np.isin(items.column(self.schema.item[0]).to_numpy(),
                       self._key_ids(exclude or []))
        order = [i for i in np.argsort(-scores, kind="stable") if not seen[i]]
        return [{"item": _key_value(keys[i]), "score": float(scores[i])} for i in order[:top_k]]

    def _key_ids(self, values: list[Any]) -> np.ndarray:
        """The ids of item keys given as their values (text or numbers); unknown ones
        (out of vocabulary) match no candidate."""
        if not isinstance(values, list):
            raise RowsError("exclude: expected a list of item keys")
        key = self.schema.item[0]
        texts = [self.rows.text(i, key, v) for i, v in enumerate(values)]
        kind = next(c.values for c in self.schema.categorical if c.name == key)
        raw, present, ok = category_values(pa.array(texts, pa.binary()), kind)
        f = self.scorer.layout.sparse.index(key)
        ids = self.scorer.encoder.ids(f, raw)
        return ids[present & ok & (ids > 1)]


def user_with_items(user: pa.Table, items: pa.Table, item: tuple[str, ...]) -> pa.Table:
    """A row per item: the encoded ``user`` row (its first) with its ``item`` columns
    replaced by the item's (encoded, as ``items`` holds them)."""
    zeros = pa.array(np.zeros(items.num_rows, np.int64))
    return pa.table({c: items.column(c) if c in item else user.column(c).take(zeros)
                     for c in user.column_names})


def _key_value(key: Any) -> Any:
    """An item key as the value it stands for: an integer key as a number (the model keeps
    keys as text: ``12``, ``#<hash>`` for a text key)."""
    if isinstance(key, str) and key.lstrip("-").isdigit():
        return int(key)
    return key


def load_lines(path: str | Path) -> list[str]:
    """A file's non-empty lines (an exclusion list: one item key per line)."""
    return [x.strip() for x in Path(path).read_text().splitlines() if x.strip()]


def candidate_rows(path: str | Path) -> list[dict]:
    """Item rows of a CSV file with a header (the item features' columns), as text (an
    empty field: missing)."""
    with open(path, newline="") as f:
        return [{k: v or None for k, v in row.items()} for row in csv.DictReader(f)]


"""What a preprocessing run records in its dataset's manifest, each part built from the
layout and the chunks' records by the driver's last step (read back: ``dlrm.schema.manifest``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dlrm.rows.layout import Layout
from dlrm.rows.like import Reference
from dlrm.schema.features import MISSING_ID, OOV_ID


def fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def standardize(layout: Layout, sums: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Mean and std of each standardized dense feature over the training sources (every
    source, or with a time column every period, but the last; a single one: all of it),
    from the chunks' sums."""
    wanted = layout.standardized
    if not wanted:
        return {}
    names = list(sums)
    train = names[:-1] or names
    total = sum(sums[n] for n in train)
    out = {}
    for j in wanted:
        rows, first, second = total[j]
        mean = first / rows if rows else 0.0
        std = float(np.sqrt(max(second / rows - mean * mean, 0.0))) if rows else 0.0
        out[layout.dense[j]] = {"mean": mean, "std": std or 1.0, "rows": int(rows),
                                "sources": train}
    return out


_SPARSE_IDS = (f"{MISSING_ID} = missing, {OOV_ID} = out of vocabulary, 2.. = vocabulary by "
               "descending frequency (hash: 1 + value % (buckets-1))")


def schema_json(layout: Layout) -> dict[str, Any]:
    """The manifest's ``schema``: the features everything downstream reads (``Features``);
    for any but Criteo's exact layout (``Layout.criteo_tsv``, recorded as it always was) also
    each bag feature's pooling, its time column and the declaration itself."""
    schema = {"label": layout.label, "dense": list(layout.dense), "sparse": list(layout.sparse)}
    if layout.criteo_tsv:
        return {**schema, "dense_transform": "missing -> 0, negative -> 0, log1p; float32",
                "sparse_ids": _SPARSE_IDS}
    return {**schema, "label_kind": layout.schema.kind,
            "pooling": [c.pooling for c in layout.schema.categorical],
            "bags": [c.name for c in layout.schema.categorical if c.multi],
            **({"time": {"column": layout.time.column, "period": layout.time.period,
                         "values": "timestamp, UTC, whole seconds"}} if layout.time else {}),
            "sparse_ids": _SPARSE_IDS, "declared": layout.schema.to_json()}


def joins_record(layout: Layout, dones: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per side table: its file and key, and the rows whose key it lacks."""
    joins = layout.schema.joins
    misses = np.zeros(len(joins), np.int64)
    for done in dones:
        misses += np.asarray(done.get("unmatched", [0] * len(joins)), np.int64)
    return [{"file": j.file, "key": j.key, "columns": list(j.columns),
             "rows_without_match": int(n)} for j, n in zip(joins, misses, strict=True)]


def oov_rates(layout: Layout, dones: list[dict[str, Any]]) -> dict[str, float]:
    """Per vocab-encoded feature: the share of its values (missing ones aside) that were
    out of vocabulary: below min_frequency or over max_vocab, or (``--like``) never seen
    by the dataset the vocabulary came from."""
    counts = np.zeros((len(layout.sparse), 2))
    for done in dones:
        counts += np.asarray(done.get("oov", np.zeros_like(counts)))
    return {c: round(float(oov / values), 6) if values else 0.0
            for c, e, (values, oov) in zip(layout.sparse, layout.encodings, counts, strict=True)
            if e.type == "vocab"}


def same_vocab_rows(old: dict[str, Any] | None, plan: dict[str, Any]) -> bool:
    """Whether a complete dataset's vocabularies were counted on (its manifest's
    ``vocab_from``) the rows a rerun asks for (one from before the record, None: only if it
    asks for the default)."""
    if "vocab_from" not in plan:
        return True
    record = {"default": True} if old is None else old
    if plan["vocab_from"] is None:
        return bool(record.get("default"))
    return record.get("specs") == plan["vocab_from"]


def growth(layout: Layout, ref: Reference, cardinalities: list[int]) -> dict[str, int]:
    """``--grow``: how many ids each vocab feature gained over ``ref``'s."""
    return {c: new - old for c, e, new, old in zip(layout.sparse, layout.encodings,
                                                   cardinalities, ref.cardinalities, strict=True)
            if e.type == "vocab"}

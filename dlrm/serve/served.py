"""The model a server serves, as one value that a reload swaps whole: the model directory,
its scorer, its request rows and their fast path, its recommender, its metadata and
version.

A reload (``POST /admin/reload``, or SIGHUP for the directory the server started with)
takes a model directory that answers the same requests: the same features, request
columns and label kind (its tables may have grown); anything else is refused with the
reason, and the old model keeps serving.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlrm.rows.like import schema_of
from dlrm.serve.model_dir import MODEL_JSON, Exported, load_exported
from dlrm.serve.predict import Scorer, layout_for
from dlrm.serve.recommend import Recommender
from dlrm.serve.request_rows import RequestRows
from dlrm.serve.scalar_rows import ScalarRows


@dataclass(frozen=True)
class Served:
    exported: Exported
    scorer: Scorer
    rows: RequestRows
    scalar: ScalarRows | None  # the fast path of small batches (None: none)
    recommender: Recommender | None
    metadata: dict[str, Any]

    @classmethod
    def of(cls, exported: Exported) -> Served:
        schema = schema_of(exported.manifest)
        rows = RequestRows(schema)
        scorer = Scorer(exported, layout_for(exported, None))
        info = exported.info
        metadata = {"schema": schema.to_json(), "tables": info["tables"],
                    "checkpoint": info["checkpoint"], "step": info["step"],
                    "trained_on": info["trained_on"],
                    # None: exported before the model directory recorded it
                    "vocabulary": info.get("vocabulary"), "label_kind": schema.kind,
                    "columns": rows.columns, "required": rows.required,
                    "version": model_version(exported), "model": str(exported.path)}
        return cls(exported, scorer, rows, ScalarRows.of(rows, scorer),
                   Recommender(scorer, rows) if schema.item else None, metadata)

    @classmethod
    def load(cls, path: str | Path) -> Served:
        return cls.of(load_exported(path))

    @property
    def version(self) -> str:
        return self.metadata["version"]

    def incompatible(self, new: Served) -> str | None:
        """Why ``new`` cannot answer this model's requests (None: it can)."""
        old_f, new_f = self.exported.features, new.exported.features
        for what, a, b in [("label", old_f.label, new_f.label),
                           ("label kind", old_f.label_kind, new_f.label_kind),
                           ("dense features", old_f.dense, new_f.dense),
                           ("categorical features", old_f.sparse, new_f.sparse),
                           ("request columns", self.rows.columns, new.rows.columns),
                           ("required fields", self.rows.required, new.rows.required),
                           ("item features", bool(self.recommender), bool(new.recommender))]:
            if a != b:
                return f"its {what} differ: {b!r}, serving {a!r}"
        return None


def model_version(exported: Exported) -> str:
    """A model directory's version: the first 12 hex digits of its model.json's sha256 (it
    names the checkpoint, the step and every file's checksum)."""
    return hashlib.sha256((exported.path / MODEL_JSON).read_bytes()).hexdigest()[:12]

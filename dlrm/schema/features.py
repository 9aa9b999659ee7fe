"""Criteo's column names, which its generator and byte-level fast reader are written for
(its schema is ``configs/schemas/criteo.toml``), and the features of a preprocessed
dataset (any layout), which everything downstream reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NUM_DENSE = 13
NUM_SPARSE = 26
LABEL = "label"
DENSE_NAMES = [f"I{i}" for i in range(1, NUM_DENSE + 1)]
SPARSE_NAMES = [f"C{i}" for i in range(1, NUM_SPARSE + 1)]
TSV_COLUMNS = [LABEL, *DENSE_NAMES, *SPARSE_NAMES]

# Categorical ids in a preprocessed dataset: 0 is "value missing", 1 "value seen too
# rarely to be in the vocabulary" (vocab encoding only), 2.. the vocabulary.
MISSING_ID = 0
OOV_ID = 1
# A managed feature's ids are its raw values hashed into [2, MANAGED_LIMIT) (0: missing);
# the model's managed-collision module maps them to rows.
MANAGED_LIMIT = (1 << 63) - 1


def holdout_halves(num_rows: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Row ranges of the validation and test halves of a held-out source.

    The torchrec_dlrm convention: the last day's first half validates, its second half
    tests. The generator uses this too, to report the Bayes AUC of each half.
    """
    mid = num_rows // 2
    return (0, mid), (mid, num_rows)


@dataclass(frozen=True)
class Features:
    """The columns of a preprocessed dataset, by name, as its manifest records them
    (``Manifest.features``). The loader, the model, the planner and the config checks
    read them from here: nothing downstream of preprocessing assumes Criteo's layout."""

    label: str
    dense: tuple[str, ...]
    sparse: tuple[str, ...]
    pooling: tuple[str, ...] = ()  # per categorical feature: sum or mean; empty: all sum
    label_kind: str = "binary"  # or regression
    # (dense feature, mean, std) of each feature the loader standardizes
    standardize: tuple[tuple[str, float, float], ...] = ()

    @classmethod
    def from_schema(cls, schema: dict[str, Any]) -> Features:
        """The features a manifest's ``schema`` records (``Manifest.features``);
        ValueError naming what is missing."""
        try:
            scale = tuple((name, float(s["mean"]), float(s["std"]))
                          for name, s in schema.get("standardize", {}).items())
            return cls(str(schema["label"]), tuple(schema["dense"]), tuple(schema["sparse"]),
                       tuple(schema.get("pooling", ())), schema.get("label_kind", "binary"),
                       scale)
        except (KeyError, TypeError) as e:
            raise ValueError(f"manifest: no feature schema ({e})") from None

    def pooling_of(self, i: int) -> str:
        """How the bag of the ``i``-th categorical feature is pooled."""
        return self.pooling[i] if self.pooling else "sum"

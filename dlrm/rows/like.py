"""New files through an existing dataset's encoding (``dlrm preprocess --like DATASET``).

A model's tables are indexed by its training dataset's ids, so tomorrow's log must be
encoded the way that dataset was: its schema (the header's columns included), each
feature's vocabulary (a value it never counted becomes the out-of-vocabulary id) or hash
buckets, and the dense statistics of its training sources. Nothing is counted again.
The new dataset's manifest names the dataset it was made like (``like``) with a checksum
of its vocabularies, so that a checkpoint is never scored on ids of another vocabulary.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dlrm.rows.inputs import with_encoding
from dlrm.rows.vocab import Encoding
from dlrm.schema.declared import SCHEMAS, Schema, load_schema
from dlrm.schema.manifest import MANIFEST, DatasetEncoding, Manifest, load_manifest

VOCAB = "vocab.npz"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def schema_of(dataset: DatasetEncoding) -> Schema:
    """The schema a dataset was read with (its manifest, or what a model directory keeps of
    it), each feature's encoding included. A dataset of Criteo's exact layout records no
    declaration, only its one encoding for all (see ``Schema.criteo_tsv``):
    ``configs/schemas/criteo.toml`` with that encoding."""
    if dataset.declared is None:
        return with_encoding(load_schema(SCHEMAS / "criteo.toml"), Encoding(**dataset.encoding))
    return Schema.from_json(dataset.declared)


@dataclass(frozen=True)
class Reference:
    """What a dataset's encoding consists of, read from its directory."""

    path: Path
    schema: Schema  # each feature's encoding included
    standardize: dict[str, Any]
    vocab_sha256: str | None  # None: hash encoding only, no vocabularies
    vocab_from: dict[str, Any]  # the rows its vocabularies were counted on ({}: unrecorded)
    generation: int = 0  # how often its vocabularies were grown (``Manifest.generation``)
    lineage: tuple[str, ...] = ()  # the vocabularies its own extends (``Manifest.lineage``)
    cardinalities: tuple[int, ...] = ()  # its table sizes, one per categorical feature

    @classmethod
    def of(cls, dataset: str | Path, manifest: Manifest) -> Reference:
        path = Path(dataset).resolve()
        vocab = path / VOCAB
        return cls(path, schema_of(manifest), manifest.standardize,
                   file_sha256(vocab) if vocab.is_file() else None,
                   manifest.vocab_from or {}, manifest.generation, tuple(manifest.lineage),
                   tuple(manifest.cardinalities))

    def vocabs(self) -> dict[str, np.ndarray]:
        """Each vocab-encoded feature's values in id order, as the dataset holds them."""
        with np.load(self.path / VOCAB) as z:
            return {name: z[name] for name in z.files}

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``like`` (of a grown dataset: its generation and lineage too)."""
        grown = ({"generation": self.generation, "lineage": list(self.lineage)}
                 if self.generation else {})
        return {"dataset": str(self.path), "vocab_sha256": self.vocab_sha256, **grown}

    def grown_json(self, growth: dict[str, int]) -> dict[str, Any]:
        """The manifest's ``grown_from`` of a dataset whose vocabularies extend these,
        ``growth`` values more per feature."""
        return {"dataset": str(self.path), "vocab_sha256": self.vocab_sha256,
                "generation": self.generation + 1,
                "lineage": [*self.lineage, self.vocab_sha256], "growth": growth}


def check_same_encoding(trained_on: str | Path, manifest: Manifest, where: str,
                        kind: str | None = None) -> None:
    """A dataset made ``--like`` another must be scored by a model trained on that one's
    ids: the vocabularies must be the same file, where the training dataset is still
    there to compare; and its label of the model's ``kind`` (see ``check_label_kind``).
    ValueError naming both otherwise."""
    check_label_kind(trained_on, manifest, where, kind)
    like = manifest.like
    vocab = Path(trained_on) / VOCAB
    grown = manifest.grown_from
    if grown is not None and vocab.is_file() \
            and Path(trained_on).resolve() != manifest.path.resolve() \
            and file_sha256(vocab) != file_sha256(manifest.path / VOCAB):
        raise ValueError(f"{where}: the dataset's vocabularies grew those of "
                         f"{grown['dataset']}; the model's tables hold the ids of "
                         f"{trained_on}, not its new ones (train the model on it with "
                         "--init-from, which grows the tables)")
    if like is None or not vocab.is_file() or like["vocab_sha256"] is None:
        return
    if file_sha256(vocab) != like["vocab_sha256"]:
        raise ValueError(f"{where}: the dataset was encoded like {like['dataset']}, whose "
                         f"vocabularies differ from those of the run's training data "
                         f"{trained_on}; preprocess it --like {trained_on}")


def check_label_kind(trained_on: str | Path, manifest: Manifest, where: str,
                     kind: str | None = None) -> None:
    """A model trained for one label kind (``kind``, else that of its training dataset,
    where it is still there) refuses data of another: ValueError naming both."""
    if kind is None:
        if not (Path(trained_on) / MANIFEST).is_file():
            return
        kind = load_manifest(trained_on).features.label_kind
    got = manifest.features.label_kind
    if got != kind:
        raise ValueError(f"{where}: its label is a {got} one, but the model was trained on "
                         f"{trained_on} for a {kind} label")

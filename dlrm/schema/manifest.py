"""A dataset's manifest and how it is read back (what preprocessing records in it:
``dlrm.preprocess.record``).

``manifest.json`` is written last, atomically, by ``dlrm preprocess``: a directory is a
complete dataset iff it holds one of this ``FORMAT``. :func:`load_manifest` reads it once
into a :class:`Manifest`, every field it records checked for presence and type, so that a
reader never meets a missing key or a value of the wrong kind: a clear error names the
file and the key instead. Fields that older manifests lack are optional (None).
"""

from __future__ import annotations

import copy
import json
import types
import typing
from dataclasses import MISSING, dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any

from dlrm.errors import PreprocessError
from dlrm.schema.features import MANAGED_LIMIT, Features

MANIFEST = "manifest.json"
FORMAT = "dlrm-criteo-parquet/1"

Json = dict[str, Any]


@dataclass(frozen=True)
class DatasetEncoding:
    """How a dataset's rows are encoded: all that encoding new rows like them needs of its
    manifest, and all a model directory keeps of its training dataset's (``model.json``'s
    ``dataset``)."""

    format: str
    schema: Json  # the features (see ``features``); a declared layout's declaration too
    encoding: Json  # Criteo's one for every feature ({"type": ...}), else one per feature
    cardinalities: list[int]  # one table size per categorical feature

    @property
    def features(self) -> Features:
        return Features.from_schema(self.schema)

    @property
    def declared(self) -> Json | None:
        """The declared schema (``Schema.to_json``); None: Criteo's fast path."""
        return self.schema.get("declared")

    @property
    def standardize(self) -> dict[str, Json]:
        """Per standardized dense feature: its mean and std over the training sources."""
        return self.schema.get("standardize", {})

    @property
    def encodings(self) -> list[Json]:
        """Each categorical feature's encoding, in order."""
        enc = self.encoding
        if "type" in enc:  # Criteo's one for all
            return [enc] * len(self.schema["sparse"])
        return [enc[c] for c in self.schema["sparse"]]

    @property
    def has_vocab(self) -> bool:
        """Whether some categorical feature is vocab-encoded."""
        return any(e.get("type") == "vocab" for e in self.encodings)

    @property
    def managed(self) -> bool:
        """Whether the categorical features are managed (raw ids the model maps to rows;
        all of them or none)."""
        return any(e.get("type") == "managed" for e in self.encodings)

    @property
    def evictions(self) -> dict[str, str]:
        """Each managed feature's eviction policy (``lfu``, ``lru``); empty: none managed."""
        return {c: e["eviction"] for c, e in zip(self.schema["sparse"], self.encodings,
                                                 strict=True) if e.get("type") == "managed"}

    @property
    def id_limits(self) -> list[int]:
        """Per categorical feature, the bound its ids lie below: its table's rows, or for
        a managed feature the raw ids' range."""
        return [MANAGED_LIMIT if e.get("type") == "managed" else n
                for e, n in zip(self.encodings, self.cardinalities, strict=True)]

    def encoding_json(self) -> Json:
        """The four blocks as JSON (a copy): what a model directory keeps."""
        return copy.deepcopy({"format": self.format, "schema": self.schema,
                              "encoding": self.encoding, "cardinalities": self.cardinalities})

    @classmethod
    def from_json(cls, doc: Any, where: Path, error: type[Exception] = PreprocessError,
                  prefix: str = "") -> DatasetEncoding:
        """The blocks of ``doc`` (read from ``where``, under ``prefix``: its keys' names in
        errors); ``error`` naming the file and the key where one is missing or mistyped."""
        return cls(**_checked(cls, doc, where, error, prefix))


@dataclass(frozen=True)
class Manifest(DatasetEncoding):
    """A complete dataset's manifest (see ``dlrm.preprocess.driver`` for what each field
    holds): ``path`` is the dataset directory; ``sources`` the input files in order,
    ``periods`` (a time column's) the units the rows are laid out by instead, each a JSON
    object with its ``name``, ``rows_accepted`` and (the units) ``files``."""

    path: Path
    sources: list[Json]
    rows_accepted: int
    rows_rejected: int
    rejected_by_reason: dict[str, int]
    seconds: float | None = None  # absent: a manifest not written by dlrm preprocess
    like: Json | None = None  # made --like another dataset: its path and vocab checksum
    grown_from: Json | None = None  # made --like DATASET --grow: DATASET, lineage, growth
    oov_rate: dict[str, float] | None = None  # per vocab feature; absent: an older one
    joins: list[Json] | None = None  # per side table: file, key, columns, rows unmatched
    vocab_from: Json | None = None  # the rows vocabularies were counted on; absent: older
    periods: list[Json] | None = None  # a time column's, in time order
    engine: Json | None = None  # --engine spark: its name and master; absent: one host

    @property
    def units(self) -> list[Json]:
        """The units splits name, in order: the periods of a time column, else the sources."""
        return self.periods if self.periods is not None else self.sources

    @property
    def generation(self) -> int:
        """How many times its vocabularies were grown since first counted (0: never); a
        dataset made ``--like`` another has that one's."""
        if self.grown_from is not None:
            return int(self.grown_from["generation"])
        return int((self.like or {}).get("generation", 0))

    @property
    def lineage(self) -> list[str]:
        """The SHA-256 of each vocabulary its own extends, oldest first (its own excluded):
        a model trained on any of them grows into this dataset's tables."""
        if self.grown_from is not None:
            return list(self.grown_from["lineage"])
        return list((self.like or {}).get("lineage", []))

    @property
    def unit_kind(self) -> str:
        """What the units are, as errors name them: ``periods`` or ``sources``."""
        return "periods" if self.periods is not None else "sources"

    @property
    def files(self) -> list[Json]:
        """Every data file (``path`` relative to ``path``, ``rows``, ``bytes``), in order."""
        return [f for unit in self.units for f in unit["files"]]

    def to_json(self) -> Json:
        """The manifest as ``manifest.json`` holds it (keys in the order written; those an
        older manifest lacks left out)."""
        doc = {f: getattr(self, f) for f in _ORDER}
        return copy.deepcopy({k: v for k, v in doc.items() if v is not None})

    @classmethod
    def from_json(cls, doc: Any, where: Path, error: type[Exception] = PreprocessError,
                  prefix: str = "") -> Manifest:
        """The manifest ``doc`` of the dataset in ``where``'s directory (see
        :meth:`DatasetEncoding.from_json`)."""
        return cls(path=where.parent, **_checked(cls, doc, where, error, prefix))


# The keys of manifest.json, in the order the driver writes them.
_ORDER = ("format", "schema", "encoding", "like", "grown_from", "cardinalities", "oov_rate",
          "joins", "vocab_from", "sources", "periods", "rows_accepted", "rows_rejected",
          "rejected_by_reason", "engine", "seconds")


def load_manifest(dataset: str | Path) -> Manifest:
    """Reads a dataset's manifest; a clear error if the dataset is missing or incomplete,
    or its manifest of another format or lacking (or mistyping) a field."""
    path = Path(dataset) / MANIFEST
    if not Path(dataset).is_dir():
        raise PreprocessError(f"dataset directory not found: {dataset}")
    if not path.is_file():
        raise PreprocessError(
            f"{path} not found: {dataset} is not a complete dataset (run `dlrm preprocess`)"
        )
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PreprocessError(f"{path}: corrupt manifest: {e}") from None
    return Manifest.from_json(doc, path)


# ------------------------------------------------------------------ checking a document


def _checked(cls: type, doc: Any, where: Path, error: type[Exception],
             prefix: str) -> dict[str, Any]:
    """The fields of ``cls`` that ``doc`` holds, each checked (``path`` aside)."""
    if not isinstance(doc, dict):
        raise error(f"{where}: corrupt {prefix.rstrip('.') or 'manifest'}: not a JSON object")
    if doc.get("format") != FORMAT:
        raise error(f"{where}: unknown format {doc.get('format')!r}, want {FORMAT}")
    out = {}
    for name, hint, required in _fields(cls):
        if required or name in doc:  # an optional one: absent from older manifests
            out[name] = _need(doc, name, hint, where, error, prefix)
    _check_schema(out["schema"], where, error, f"{prefix}schema.")
    if "sources" in out:
        _check_units(out, where, error, prefix)
    if out.get("grown_from") is not None:
        for key, hint in (("dataset", str), ("vocab_sha256", str), ("generation", int),
                          ("lineage", list[str]), ("growth", dict[str, int])):
            _need(out["grown_from"], key, hint, where, error, f"{prefix}grown_from.")
    return out


_UNIONS = (types.UnionType, typing.Union)


@cache
def _fields(cls: type) -> list[tuple[str, Any, bool]]:
    """Each field of ``cls`` a document holds: its name, type and whether it is required."""
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name], f.default is MISSING) for f in fields(cls)
            if f.name != "path"]


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in _UNIONS:
        return any(_fits(value, a) for a in args)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(v, args[1]) for v in value.values())
    if isinstance(value, bool) and hint in (int, float):
        return False
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in _UNIONS:
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is list:
        return f"a list of {_describe(args[0]).split(' ', 1)[1]}s"
    if origin is dict:
        inner = "" if args[1] is Any else f" of {_describe(args[1]).split(' ', 1)[1]}s"
        return f"an object{inner}"
    return {str: "a string", int: "an integer", float: "a number"}.get(hint, "an object")


def _need(doc: Json, key: str, hint: Any, where: Path, error: type[Exception],
          prefix: str) -> Any:
    """``doc[key]``, of the type ``hint``; ``error`` naming the file and the key (under
    ``prefix``: ``sources[0].files[1].rows``)."""
    name = f"{prefix}{key}"
    if key not in doc:
        raise error(f"{where}: no {name!r}: the manifest of a complete dataset records it "
                    "(preprocess it again)")
    value = doc[key]
    if not _fits(value, hint):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise error(f"{where}: {name!r}: expected {_describe(hint)}, got {shown}")
    return value


def _check_schema(schema: Json, where: Path, error: type[Exception], prefix: str) -> None:
    """The parts of the schema that ``Features`` reads."""
    _need(schema, "label", str, where, error, prefix)
    _need(schema, "dense", list[str], where, error, prefix)
    _need(schema, "sparse", list[str], where, error, prefix)
    for key, hint in (("pooling", list[str]), ("label_kind", str),
                      ("standardize", dict[str, Json]), ("declared", Json)):
        if key in schema:
            _need(schema, key, hint, where, error, prefix)
    for name, stats in schema.get("standardize", {}).items():
        for key in ("mean", "std"):
            _need(stats, key, float, where, error, f"{prefix}standardize.{name}.")


def _check_units(out: Json, where: Path, error: type[Exception], prefix: str) -> None:
    """Each source and period's name and rows, and each unit's files (path, rows)."""
    for kind in ("sources", "periods"):
        for i, unit in enumerate(out.get(kind) or []):
            _need(unit, "name", str, where, error, f"{prefix}{kind}[{i}].")
            _need(unit, "rows_accepted", int, where, error, f"{prefix}{kind}[{i}].")
    kind = "periods" if out.get("periods") is not None else "sources"
    for i, unit in enumerate(out[kind]):
        files = _need(unit, "files", list[Json], where, error, f"{prefix}{kind}[{i}].")
        for j, f in enumerate(files):
            at = f"{prefix}{kind}[{i}].files[{j}]."
            _need(f, "path", str, where, error, at)
            _need(f, "rows", int, where, error, at)
            if "bytes" in f:  # older manifests record no sizes
                _need(f, "bytes", int, where, error, at)

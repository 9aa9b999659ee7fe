"""Checks of a run's splits against each other and against the rows a dataset's
vocabularies were counted on (``Manifest.vocab_from``, see ``dlrm.preprocess.vocab_rows``).

No row may be in two of train, val and test unless ``data.allow_overlap`` says so; no val
or test row may have been counted by the vocabulary, or its values would have ids (and
rows in the tables) of their own that a model could only have learnt by seeing them.
"""

from __future__ import annotations

import itertools
import logging

from dlrm.config import DataConfig
from dlrm.schema.manifest import Manifest, load_manifest
from dlrm.schema.splits import (
    count_rows,
    default_split_specs,
    describe,
    difference,
    intersection,
    merged,
    row_ranges,
)

logger = logging.getLogger(__name__)


def split_specs(cfg: DataConfig, manifest: Manifest) -> dict[str, list[str]]:
    """Sources of each split of a run: the config's, else
    (key absent) the default (see :func:`default_split_specs`); ``"none"`` is no rows."""
    given = {"train": cfg.train_sources, "val": cfg.val_sources, "test": cfg.test_sources}
    defaults = default_split_specs(manifest)
    return {s: defaults[s] if given[s] is None else [] if given[s] == "none" else given[s]
            for s in ("train", "val", "test")}


def check_overlaps(manifest: Manifest, specs: dict[str, list[str]],
                   ranges: dict[str, list[tuple[int, int]]]) -> None:
    """Raises ValueError naming two splits (or one split twice) that share rows."""
    for split, r in ranges.items():
        if count_rows(r) != sum(hi - lo for lo, hi in r):
            twice = merged([x for a, b in itertools.combinations(r, 2)
                            for x in intersection([a], [b])])
            raise ValueError(f"data.{split}_sources: {specs[split]} name "
                             f"{describe(manifest, twice)} twice")
    for a, b in itertools.combinations(ranges, 2):
        shared = intersection(ranges[a], ranges[b])
        if shared:
            raise ValueError(
                f"data.{a}_sources {specs[a]} and data.{b}_sources {specs[b]} share "
                f"{describe(manifest, shared)}: no row may be in two splits (set "
                "data.allow_overlap = true for a deliberate overlap)")


def counted_rows(manifest: Manifest) -> list[tuple[int, int]] | None:
    """The rows of this dataset its vocabularies were counted on; None where unknown (a
    dataset from before the record) or where no row of it was (hash encoding only, or a
    vocabulary taken ``--like`` from another dataset)."""
    record = manifest.vocab_from
    if record is None or "like" in record:
        return None
    return [tuple(r) for r in record["rows"]]


def check_vocab_rows(manifest: Manifest, ranges: dict[str, list[tuple[int, int]]],
                     dataset: str, splits: tuple[str, ...] = ("val", "test")) -> None:
    """Raises ValueError if rows of ``splits`` were counted by the vocabulary (a leak);
    warns where training rows were not counted, or where the dataset does not say."""
    if not manifest.has_vocab:
        return
    if manifest.vocab_from is None:
        logger.warning("%s: the manifest does not record which rows its vocabularies were "
                       "counted on (made before --vocab-from): they may hold ids that only "
                       "val or test rows have; preprocess again to be sure", dataset)
        return
    counted = counted_rows(manifest)
    if counted is None:
        return
    record = manifest.vocab_from
    for split in splits:
        leaked = intersection(counted, ranges.get(split, []))
        if leaked:
            raise ValueError(
                f"data.{split}_sources: {describe(manifest, leaked)} were counted by the "
                f"vocabularies of {dataset} (dlrm preprocess --vocab-from "
                f"{' '.join(record['specs'])}): their values have ids of their own, a leak "
                f"of {split} rows into training. Preprocess with --vocab-from naming the "
                "training rows only")
    missed = difference(ranges.get("train", []), counted)
    if missed:
        logger.warning("%s: %s of the training rows were not counted by the vocabularies "
                       "(--vocab-from %s): values only they hold are out of vocabulary",
                       dataset, describe(manifest, missed), " ".join(record["specs"]))


def check_data(cfg: DataConfig) -> Manifest:
    """Everything about the data that can be wrong, checked before any process group starts:
    the split sources, their overlaps, and the rows the vocabularies were counted on.

    Raises:
        ValueError: naming ``data.path``, the bad split source, or the splits that share
            rows (or were counted by the vocabulary) and the rows.
    """
    try:
        manifest = load_manifest(cfg.path)
    except Exception as e:
        raise ValueError(f"data.path: {e}") from None
    specs = split_specs(cfg, manifest)
    ranges = {}
    for split, spec in specs.items():
        try:
            ranges[split] = row_ranges(manifest, spec)
        except ValueError as e:
            raise ValueError(f"data.{split}_sources: {e}") from None
    if not cfg.allow_overlap:
        check_overlaps(manifest, specs, ranges)
    check_vocab_rows(manifest, ranges, cfg.path)
    return manifest  # its features checked as it was read

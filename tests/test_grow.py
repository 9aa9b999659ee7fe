"""`dlrm preprocess --like DATASET --grow`: DATASET's vocabularies extended by the new
files' training rows, old ids fixed, the lineage recorded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import REPO, quiet

from dlrm.errors import PreprocessError
from dlrm.preprocess.driver import preprocess
from dlrm.rows.like import file_sha256
from dlrm.rows.vocab import Encoding
from dlrm.schema.features import OOV_ID
from dlrm.synth.criteo import synth


@pytest.fixture(scope="module")
def days(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grow")
    synth(root / "raw", days=4, rows_per_day=2000, seed=5)
    # Days 0-1 counted (min_frequency 2, so that growth has a threshold to meet).
    preprocess([root / "raw" / f"day_{d}" for d in (0, 1)], root / "base", workers=1,
               log=quiet, encoding=Encoding(min_frequency=2))
    return root


def _vocab(dataset: Path) -> dict[str, np.ndarray]:
    with np.load(dataset / "vocab.npz") as z:
        return {k: z[k] for k in z.files}


def _ids(dataset: Path, feature: str) -> np.ndarray:
    files = sorted(dataset.glob("**/*.parquet"))
    return np.concatenate([pq.read_table(f, columns=[feature]).column(0).to_numpy()
                           for f in files])


def test_grown_vocabularies_keep_old_ids_and_append_the_new_training_values(days, tmp_path):
    raw, base = days / "raw", days / "base"
    # Days 2 and 3: by the default rule day 2 trains, day 3 is val and test: its values
    # must not grow the vocabularies.
    inputs = [raw / "day_2", raw / "day_3"]
    grown = preprocess(inputs, tmp_path / "grown", workers=1, log=quiet, like=base, grow=True)
    # The oracle: the same files counted from scratch by the same rule and encoding.
    fresh = preprocess(inputs, tmp_path / "fresh", workers=1, log=quiet,
                       encoding=Encoding(min_frequency=2))
    old, new, counted = _vocab(base), _vocab(tmp_path / "grown"), _vocab(tmp_path / "fresh")
    assert set(new) == set(old)
    for c in old:
        assert np.array_equal(new[c][:old[c].size], old[c]), c  # old ids never move
        appended = counted[c][~np.isin(counted[c], old[c])]  # in their counted order
        assert np.array_equal(new[c][old[c].size:], appended), c
        assert grown.grown_from["growth"][c] == appended.size
    assert sum(grown.grown_from["growth"].values()) > 100
    assert grown.vocab_from["specs"] == ["day_2"] and fresh.vocab_from == grown.vocab_from
    base_manifest = json.loads((base / "manifest.json").read_text())
    assert grown.cardinalities == [o + grown.grown_from["growth"].get(c, 0) for c, o in zip(
        grown.features.sparse, base_manifest["cardinalities"], strict=True)]
    assert grown.like is None and grown.generation == 1
    assert grown.grown_from["dataset"] == str(base.resolve())
    assert grown.lineage == [file_sha256(base / "vocab.npz")]
    # The dense statistics stay the parent's: a warm-started model reads the same scale.
    assert grown.standardize == base_manifest["schema"].get("standardize", {})

    # Rows: a value the parent knew has its id there; a new one an id after the old ones.
    like = preprocess(inputs, tmp_path / "like", workers=1, log=quiet, like=base)
    for c in ("C3", "C12"):
        was, now = _ids(tmp_path / "like", c), _ids(tmp_path / "grown", c)
        known = was != OOV_ID
        assert np.array_equal(now[known], was[known])
        assert (now[~known & (now != OOV_ID)] >= old[c].size + 2).all()
        assert (~known & (now != OOV_ID)).sum() > 0
    assert like.cardinalities == base_manifest["cardinalities"]

    # A rerun finds its dataset; a second growth extends the lineage; a dataset made
    # --like a grown one carries its generation.
    again = preprocess(inputs, tmp_path / "grown", workers=1, log=quiet, like=base, grow=True)
    assert again.grown_from == grown.grown_from
    second = preprocess([raw / "day_3"], tmp_path / "second", workers=1, log=quiet,
                        like=tmp_path / "grown", grow=True, vocab_from=["day_3"])
    assert second.generation == 2
    assert second.lineage == [*grown.lineage, file_sha256(tmp_path / "grown" / "vocab.npz")]
    assert np.array_equal(_vocab(tmp_path / "second")["C3"][:new["C3"].size], new["C3"])
    test_day = preprocess([raw / "day_3"], tmp_path / "test_day", workers=1, log=quiet,
                          like=tmp_path / "grown")
    assert test_day.generation == 1 and test_day.lineage == grown.lineage


def test_growth_stops_at_max_vocab(days, tmp_path):
    raw = days / "raw"
    capped = tmp_path / "capped"
    preprocess([raw / "day_0"], capped, workers=1, log=quiet,
               encoding=Encoding(max_vocab=300), vocab_from=["day_0"])
    old = _vocab(capped)
    grown = preprocess([raw / "day_1"], tmp_path / "grown", workers=1, log=quiet, like=capped,
                       grow=True, vocab_from=["day_1"])
    new = _vocab(tmp_path / "grown")
    for c in old:
        assert new[c].size <= max(300, old[c].size)
        assert np.array_equal(new[c][:old[c].size], old[c])
    full = [c for c in old if old[c].size == 300]
    assert full and all(grown.grown_from["growth"][c] == 0 for c in full)
    assert any(grown.grown_from["growth"][c] > 0 for c in old if old[c].size < 300)


def test_grow_is_refused_without_vocabularies_to_grow(days, tmp_path):
    raw = days / "raw"
    with pytest.raises(PreprocessError, match="--grow extends .* --like DATASET"):
        preprocess([raw / "day_2"], tmp_path / "a", log=quiet, grow=True)
    hashed = tmp_path / "hashed"
    preprocess([raw / "day_0"], hashed, workers=1, log=quiet,
               encoding=Encoding(type="hash", buckets=1000))
    with pytest.raises(PreprocessError, match="no vocabularies to grow"):
        preprocess([raw / "day_2"], tmp_path / "b", log=quiet, like=hashed, grow=True)
    # Without --grow, --like still counts nothing: --vocab-from is refused by name.
    proc = subprocess.run([sys.executable, "-m", "dlrm", "preprocess", "--input",
                           str(raw / "day_2"), "--out", str(tmp_path / "c"), "--like",
                           str(days / "base"), "--vocab-from", "day_2"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--vocab-from has nothing to count" in proc.stderr

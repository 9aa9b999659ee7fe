"""`dlrm preprocess --like DATASET`: new files through a dataset's own encoding, scored by
a checkpoint trained on that dataset."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import ML_HEADER, REPO, dlrm, movielens_rows, quiet, read_units, write_csv

from dlrm.errors import PreprocessError
from dlrm.preprocess.driver import preprocess
from dlrm.schema.declared import load_schema


def test_a_day_encoded_like_its_dataset_scores_as_it_did_there(small_dataset, trained,
                                                                tmp_path):
    raw = small_dataset.parent / "raw"
    new = tmp_path / "new"
    manifest = preprocess([raw / "day_2"], new, log=quiet, like=small_dataset)
    original = json.loads((small_dataset / "manifest.json").read_text())
    # The same ids and dense values as the dataset holds for that day, counted nowhere.
    assert read_units(new, manifest.sources).equals(
        read_units(small_dataset, original["sources"][2:]))
    assert manifest.like["dataset"] == str(small_dataset.resolve())
    assert manifest.cardinalities == original["cardinalities"]
    # Day 2 is the dataset's val and test day, which its vocabularies did not count: the
    # values only it holds are out of vocabulary here as they are there.
    assert max(manifest.oov_rate.values()) > 0
    assert manifest.vocab_from == {"like": str(small_dataset.resolve()),
                                      **original["vocab_from"]}
    # Made like the new one, a dataset still carries the training vocabulary's checksum.
    again = preprocess([raw / "day_1"], tmp_path / "again", log=quiet, like=new)
    assert again.like["vocab_sha256"] == manifest.like["vocab_sha256"]

    # Scored whole (the default split of a --like dataset) it gives the probabilities the
    # run's val and test halves of that day got.
    dlrm("score", "--checkpoint", str(trained), "--data", str(new), "--out",
         str(tmp_path / "new.parquet"))
    halves = [tmp_path / f"{s}.parquet" for s in ("val", "test")]
    for split, out in zip(("val", "test"), halves, strict=True):
        dlrm("score", "--checkpoint", str(trained), "--data", str(small_dataset), "--split",
             split, "--out", str(out))
    got = pq.read_table(tmp_path / "new.parquet")
    want = np.concatenate([pq.read_table(h).column("prob").to_numpy() for h in halves])
    assert got.num_rows == 4000
    np.testing.assert_array_equal(got.column("prob").to_numpy(), want)
    out = dlrm("evaluate", "--checkpoint", str(trained), "--data", str(new)).stdout
    assert '"split": "all"' in out and '"rows": 4000' in out


def test_a_checkpoint_refuses_data_encoded_like_another_dataset(small_dataset, trained,
                                                                tmp_path):
    raw = small_dataset.parent / "raw"
    other = tmp_path / "other"
    preprocess([raw / "day_0"], other, log=quiet)  # another vocabulary
    preprocess([raw / "day_2"], tmp_path / "new", log=quiet, like=other)
    proc = subprocess.run([sys.executable, "-m", "dlrm", "evaluate", "--checkpoint",
                           str(trained), "--data", str(tmp_path / "new")], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"encoded like {other.resolve()}" in proc.stderr and str(small_dataset) in proc.stderr


def test_unseen_values_are_out_of_vocabulary_and_counted(tmp_path):
    """MovieLens layout (bags, a time column, a header): known values keep their ids, an
    unseen one becomes the OOV id, and the manifest gives each feature's OOV share."""
    old = tmp_path / "old.csv"
    write_csv(old, ML_HEADER, movielens_rows(2000, 0))
    base = preprocess([old], tmp_path / "base", log=quiet, schema=load_schema("movielens"))
    rows = movielens_rows(1000, 1, start=975_628_800 + 40 * 86_400)
    for i in range(0, 1000, 4):  # a quarter of the users are new, every 10th movie too
        rows[i][0] = 10_000 + i
    for i in range(0, 1000, 10):
        rows[i][1], rows[i][5] = 50_000 + i, "Documentary|Drama"
    write_csv(tmp_path / "new.csv", ML_HEADER, rows)
    manifest = preprocess([tmp_path / "new.csv"], tmp_path / "like", log=quiet,
                          like=tmp_path / "base")
    assert manifest.encoding == base.encoding
    assert manifest.cardinalities == base.cardinalities
    rate = manifest.oov_rate
    assert rate["user_id"] == 0.25 and rate["movie_id"] == 0.1
    genres = sum(len(r[5].split("|")) for r in rows)
    assert rate["genres"] == round(100 / genres, 6)  # "Documentary" only
    assert rate["gender"] == rate["zip"] == 0.0

    vocab = np.load(tmp_path / "base" / "vocab.npz")
    table = read_units(tmp_path / "like", manifest.periods)
    users = table.column("user_id").to_numpy()
    known = {int(v): i + 2 for i, v in enumerate(vocab["user_id"])}  # an integer is its value
    assert list(users) == [known.get(r[0], 1) for r in rows]


def test_like_takes_no_other_schema_and_checks_the_header(small_dataset, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dlrm", "preprocess", "--like",
                           str(small_dataset), "--schema", "avazu", "--input",
                           str(small_dataset.parent / "raw" / "day_0"), "--out",
                           str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "--like" in proc.stderr
    write_csv(tmp_path / "a.csv", ML_HEADER, movielens_rows(50, 0))
    preprocess([tmp_path / "a.csv"], tmp_path / "base", log=quiet,
               schema=load_schema("movielens"))
    write_csv(tmp_path / "b.csv", ML_HEADER.replace("zip", "zipcode"), movielens_rows(50, 1))
    with pytest.raises(PreprocessError, match="b.csv: header"):
        preprocess([tmp_path / "b.csv"], tmp_path / "new", log=quiet, like=tmp_path / "base")
    with pytest.raises(PreprocessError, match="not found"):
        preprocess([tmp_path / "a.csv"], tmp_path / "new", log=quiet, like=tmp_path / "none")

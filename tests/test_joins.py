"""A ratings log with its user and movie tables, as they come (schema `[[join]]`): joined in
preprocessing, carried by the export, used by predict and recommend; and the regression
model's predictions, items and report."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import dlrm

from dlrm.rows.codecs import category_values
from dlrm.schema.declared import load_schema
from dlrm.serve.model_dir import load_exported
from dlrm.serve.predict import Scorer, layout_for
from dlrm.serve.recommend import Recommender
from dlrm.serve.request_rows import RequestRows, RowsError

SCHEMA = """
ignore = ["title"]
[input]
format = "csv"
header = true
[label]
column = "rating"
kind = "regression"
[categorical]
columns = ["user_id", "movie_id", "genres", "gender", "age", "zip"]
[categorical.per_feature.genres]
separator = ";"
max_length = 6
pooling = "mean"
[[join]]
file = "tables/users.csv"
key = "user_id"
columns = ["gender", "age", "zip"]
[[join]]
file = "tables/movies.dat"
format = "tsv"
delimiter = "|"
header = false
names = ["movie_id", "name", "genres"]
key = "movie_id"
columns = ["genres"]
[time]
column = "timestamp"
format = "unix"
period = "day"
[roles]
user = ["user_id", "gender", "age", "zip"]
item = ["movie_id", "genres"]
"""
USERS, MOVIES, ROWS = 60, 40, 4000
NEW_MOVIE = 99  # rated only in the last rows: the test split's


def _ratings(path, rows, title=True):
    with open(path, "w") as f:
        f.write("user_id,movie_id,rating,timestamp" + (",title" if title else "") + "\n")
        for u, m, r, t in rows:
            f.write(f"{u},{m},{r},{t}" + (f',"Movie {m}, The"' if title else "") + "\n")


@pytest.fixture(scope="module")
def joined(tmp_path_factory):
    root = tmp_path_factory.mktemp("joined")
    rng = np.random.default_rng(0)
    bias = rng.normal(0, 1, MOVIES + 1)
    rows = []
    for i in range(ROWS):
        u, m = int(rng.integers(1, USERS + 1)), int(rng.integers(1, MOVIES + 1))
        if i >= ROWS - 20:
            m = NEW_MOVIE
        r = int(np.clip(np.round(3 + bias[m % (MOVIES + 1)] + rng.normal(0, 0.5)), 1, 5))
        rows.append((u, m, r, 1_000_000_000 + 60 * i))
    (root / "tables").mkdir()
    _ratings(root / "ratings.csv", rows)
    with open(root / "tables" / "users.csv", "w") as f:
        f.write("user_id,gender,age,zip\n")
        for u in range(1, USERS - 4):  # the last 5 users are in no table
            f.write(f"{u},{'MF'[u % 2]},{[1, 18, 25][u % 3]},{u:05d}\n")
    with open(root / "tables" / "movies.dat", "w") as f:
        for m in (*range(1, MOVIES + 1), NEW_MOVIE):
            f.write(f"{m}|Movie {m}|{'Drama;Comedy' if m % 2 else 'War'}\n")
    (root / "schema.toml").write_text(SCHEMA)
    data = root / "data"
    dlrm("preprocess", "--schema", str(root / "schema.toml"), "--input",
         str(root / "ratings.csv"), "--out", str(data), "--vocab-from", "*[0:0.9]")
    run = root / "run"
    dlrm("train", "--config", "configs/movielens_rating.toml", f"--data.path={data}",
         "--run-dir", str(run), "--train.epochs=2", "--data.batch_size=128")
    checkpoint = sorted((run / "checkpoints").glob("step-*[0-9]"))[-1]
    dlrm("export", "--checkpoint", str(checkpoint), "--out", str(root / "model"))
    return root, rows, checkpoint


def test_rows_without_a_match_are_counted_and_get_missing_values(joined):
    root, rows, _ = joined
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    lost = sum(u > USERS - 5 for u, *_ in rows)
    users, movies = manifest["joins"]
    assert users["key"] == "user_id" and users["rows_without_match"] == lost > 0
    assert movies["rows_without_match"] == 0
    assert users["file"] == str((root / "tables" / "users.csv").resolve())
    table = pq.read_table(root / "data" / manifest["periods"][0]["files"][0]["path"])
    uid = np.array([u for u, *_ in rows[:table.num_rows]])
    gender = table.column("gender").to_numpy()
    assert (gender[uid > USERS - 5] == 0).all() and (gender[uid <= USERS - 5] >= 2).all()
    # zip codes are text: "00007" is not the integer 7
    vocab = np.load(root / "data" / "vocab.npz")
    assert 7 not in vocab["zip"].tolist() and vocab["zip"].size == USERS - 5


def test_a_key_twice_in_a_table_is_refused_naming_the_file_and_line(joined, tmp_path):
    root = joined[0]
    shutil.copytree(root / "tables", tmp_path / "tables")
    shutil.copy(root / "schema.toml", tmp_path / "schema.toml")
    with open(tmp_path / "tables" / "users.csv", "a") as f:
        f.write("7,F,25,99999\n")
    proc = dlrm("preprocess", "--schema", str(tmp_path / "schema.toml"), "--input",
                str(root / "ratings.csv"), "--out", str(tmp_path / "data"), check=False)
    assert proc.returncode == 2
    assert f"{tmp_path / 'tables' / 'users.csv'}: line {USERS - 4 + 1}: key user_id = '7' " \
           "again (first at line 8)" in proc.stderr


def test_the_export_scores_raw_rows_with_its_own_tables(joined, tmp_path):
    root, rows, _ = joined
    model = tmp_path / "model"
    shutil.copytree(root / "model", model)  # the tables travel with it
    assert sorted(p.name for p in (model / "joins").iterdir()) == ["0-users.csv",
                                                                    "1-movies.dat"]
    moved = tmp_path / "elsewhere"
    shutil.move(root / "tables", moved)
    try:
        dlrm("predict", "--model", str(model), "--input", str(root / "ratings.csv"), "--out",
             str(tmp_path / "a.parquet"))
        # The ignored column may be left out of rows to score.
        _ratings(tmp_path / "plain.csv", rows, title=False)
        dlrm("predict", "--model", str(model), "--input", str(tmp_path / "plain.csv"),
             "--out", str(tmp_path / "b.parquet"))
    finally:
        shutil.move(moved, root / "tables")
    a, b = (pq.read_table(tmp_path / f"{x}.parquet") for x in "ab")
    assert a.num_rows == ROWS
    np.testing.assert_array_equal(a.column("prediction").to_numpy(),
                                  b.column("prediction").to_numpy())


def test_regression_predictions_stay_within_the_training_labels(joined, tmp_path):
    root, rows, checkpoint = joined
    info = json.loads((root / "model" / "model.json").read_text())
    train = [r for _, _, r, _ in rows[:int(0.9 * ROWS)]]
    assert info["prediction_range"] == [min(train), max(train)]
    dlrm("predict", "--model", str(root / "model"), "--input", str(root / "ratings.csv"),
         "--out", str(tmp_path / "p.parquet"))
    p = pq.read_table(tmp_path / "p.parquet").column("prediction").to_numpy()
    assert p.min() >= min(train) and p.max() <= max(train)
    dlrm("export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "raw"),
         "--no-clip")
    assert json.loads((tmp_path / "raw" / "model.json").read_text())["prediction_range"] is None


def test_recommend_offers_the_training_items_and_checks_the_user(joined):
    root = joined[0]
    exported = load_exported(root / "model")
    scorer = Scorer(exported, layout_for(exported, None))
    rows = RequestRows(load_schema(root / "schema.toml"))
    recommender = Recommender(scorer, rows)
    keys = recommender.items.column("item").to_pylist()
    assert sorted(map(int, keys)) == list(range(1, MOVIES + 1))  # not the test split's 99
    top = recommender.recommend({"user_id": 3}, 5)
    assert all(isinstance(t["item"], int) for t in top)  # integer keys as numbers
    for user, field in [({}, "missing field(s) user_id"), ({"user_id": 863.5}, "863.5"),
                        ({"user_id": 99999999999999999999999}, "no 64-bit id")]:
        with pytest.raises(RowsError, match=re.escape(field)):
            recommender.recommend(user, 5)


def test_a_regression_report_plots_predicted_against_actual(joined, monkeypatch):
    from dlrm.experiments import report

    run = joined[2].parent.parent
    labels = {}  # what each figure's first axes say
    monkeypatch.setattr(report, "save_figure", lambda fig, path: labels.setdefault(
        path.name, fig.axes[0].get_ylabel()))
    report.report(run)
    assert labels["loss.png"] == "squared error (window mean)"  # not "log loss"
    assert labels["predicted.png"] == "predicted" and labels["residuals.png"] == "rows"
    monkeypatch.undo()
    dlrm("report", str(run))
    page = (run / "report" / "index.md").read_text()
    assert "Predicted vs actual (test)" in page and "Residuals (test)" in page
    assert (run / "report" / "predicted.png").stat().st_size > 0
    assert (run / "report" / "residuals.png").stat().st_size > 0
    curves = json.loads((run / "eval" / "test.json").read_text())["curves"]
    assert sum(curves["residuals"]["counts"]) == json.loads(
        (run / "eval" / "test.json").read_text())["metrics"]["rows"]


def test_text_that_is_no_canonical_integer_stays_text():
    import pyarrow as pa

    v, present, _ = category_values(pa.array([b"00000", b"0", b"01002", b"1002", b"-0", b"-5"],
                                             pa.binary()), "auto")
    assert v[1] == 0 and v[3] == 1002 and v[5] == np.uint64(2**64 - 5)
    assert (v[[0, 2, 4]] >= np.uint64(2**63)).all() and len(set(v.tolist())) == 6

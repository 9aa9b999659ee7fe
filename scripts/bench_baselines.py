"""The MovieLens recipes against classic baselines, on planted ratings where new users
arrive over time, split by time and at random.

Run:  .venv/bin/python scripts/bench_baselines.py [--users 3000] [--items 800]
      [--ratings 40] [--keep DIR] [--nproc 1]
(needs scikit-surprise: `.venv/bin/pip install scikit-surprise`; `make bench` installs it)

The planted log (MovieLens-1M's layout: a ratings file, a users table and a movies table,
joined by the schema's [[join]]): users arrive one after another, each rates ``--ratings``
movies over their first weeks; a rating is a global mean, plus a user bias of which half
follows their side features (gender, age, occupation), plus the movie's bias (half
following its genres), plus a user-movie interaction, plus noise, rounded into 1..5.

Splits (80% train, 10% val, 10% test, each time one dataset):
- time: the ratings in time order, the last 20% held out; most test users are new.
- random: the ratings shuffled, so a split is a random sample and test users are known.

Measured on the test rows, all fitted on the same training rows:
- dlrm `configs/movielens_rating.toml` (RMSE) and `configs/movielens.toml` (AUC of
  rating >= 4), with only the data path and splits set; vocabularies from the training
  rows (`--vocab-from`, the rule since issue 24);
- the same recipe on a dataset whose vocabularies counted every row, test rows included
  (the rule before: its leak, as a number);
- the rating recipe without its `data.oov_dropout` on user_id (what that rests on);
- scikit-surprise's global mean (NormalPredictor's mean), BaselineOnly (user and item
  biases, ALS), SVD and SVD++ (unknown users fall back to the biases they have), each
  also scored by AUC of rating >= 4 through its predicted rating.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = """
[input]
format = "csv"
header = true
[label]
column = "rating"
{label}
[categorical]
columns = ["user_id", "movie_id", "genres", "gender", "age", "occupation", "zip"]
[categorical.per_feature.genres]
separator = "|"
max_length = 6
pooling = "mean"
[[join]]
file = "users.csv"
key = "user_id"
columns = ["gender", "age", "occupation", "zip"]
[[join]]
file = "movies.csv"
key = "movie_id"
columns = ["genres"]
{time}
[roles]
user = ["user_id", "gender", "age", "occupation", "zip"]
item = ["movie_id", "genres"]
"""
TIME = '[time]\ncolumn = "timestamp"\nformat = "unix"\nperiod = "week"'
GENRES = 18
SPLITS = ['--data.train_sources=["*[0:0.8]"]', '--data.val_sources=["*[0.8:0.9]"]',
          '--data.test_sources=["*[0.9:1]"]']


def plant(root: Path, users: int, items: int, per_user: int, seed: int) -> dict:
    """The planted ratings in time order, and the users and movies tables."""
    rng = np.random.default_rng(seed)
    gender, age = rng.integers(0, 2, users), rng.integers(0, 7, users)
    occupation = rng.integers(0, 21, users)
    side = (rng.normal(0, 0.35, 2)[gender] + rng.normal(0, 0.35, 7)[age]
            + rng.normal(0, 0.25, 21)[occupation])
    user_bias = side + rng.normal(0, 0.35, users)
    genres = [rng.choice(GENRES, rng.integers(1, 4), replace=False) for _ in range(items)]
    genre_bias = rng.normal(0, 0.4, GENRES)
    item_bias = np.array([genre_bias[g].mean() for g in genres]) + rng.normal(0, 0.4, items)
    pop = rng.zipf(1.6, items).astype(float)
    pop /= pop.sum()
    k = 8
    pu, qi = rng.normal(0, 0.3, (users, k)), rng.normal(0, 0.3, (items, k))
    start = 1_000_000_000 + np.sort(rng.integers(0, 200 * 86400, users))  # arrivals
    rows = []
    for u in range(users):
        n = int(rng.integers(per_user // 2, per_user * 3 // 2))
        movies = rng.choice(items, size=min(n, items), replace=False, p=pop)
        when = start[u] + np.sort(rng.integers(0, 21 * 86400, movies.size))
        score = 3.6 + user_bias[u] + item_bias[movies] + qi[movies] @ pu[u] \
            + rng.normal(0, 0.6, movies.size)
        rating = np.clip(np.round(score), 1, 5).astype(int)
        rows += [(u + 1, int(m) + 1, int(r), int(t)) for m, r, t in zip(movies, rating, when,
                                                                        strict=True)]
    rows.sort(key=lambda r: r[3])
    with open(root / "users.csv", "w") as f:
        f.write("user_id,gender,age,occupation,zip\n")
        for u in range(users):
            f.write(f"{u + 1},{'MF'[gender[u]]},{[1, 18, 25, 35, 45, 50, 56][age[u]]},"
                    f"{occupation[u]},{rng.integers(0, 99999):05d}\n")
    with open(root / "movies.csv", "w") as f:
        f.write("movie_id,title,genres\n")
        for m in range(items):
            f.write(f'{m + 1},"Movie {m + 1} (2000)",{"|".join(f"g{g}" for g in genres[m])}\n')
    return {"rows": rows}


def write_ratings(path: Path, rows: list[tuple]) -> None:
    with open(path, "w") as f:
        f.write("user_id,movie_id,rating,timestamp\n")
        f.writelines(f"{u},{m},{r},{t}\n" for u, m, r, t in rows)


def dlrm(*args: str, nproc: int = 1) -> dict:
    """Runs a dlrm command; returns its last event of each kind."""
    cmd = [sys.executable, "-m", "dlrm", *args]
    if args[0] == "train" and nproc > 1:
        cmd = [*cmd[:4], "--nproc-per-node", str(nproc), *cmd[4:]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    events = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            e = json.loads(line)
            events[e["event"]] = e
    return events


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def baselines(work: Path, train: list[tuple], test: list[tuple]) -> dict[str, dict[str, float]]:
    from surprise import SVD, BaselineOnly, Dataset, Reader, SVDpp

    path = work / "surprise-train.csv"
    path.write_text("".join(f"{u},{i},{r}\n" for u, i, r, _ in train))
    reader = Reader(line_format="user item rating", sep=",", rating_scale=(1, 5))
    trainset = Dataset.load_from_file(str(path), reader).build_full_trainset()
    y = np.array([r for _, _, r, _ in test], float)
    out = {}
    mean = trainset.global_mean
    out["global mean"] = {"rmse": float(np.sqrt(np.mean((y - mean) ** 2))), "auc": 0.5}
    for name, algo in [("BaselineOnly (biases)", BaselineOnly(verbose=False)),
                       ("SVD", SVD(random_state=0)), ("SVD++", SVDpp(random_state=0))]:
        algo.fit(trainset)
        p = np.array([algo.predict(str(u), str(i)).est for u, i, _, _ in test])
        out[name] = {"rmse": float(np.sqrt(np.mean((y - p) ** 2))), "auc": auc(y >= 4, p)}
    return out


def run_dlrm(work: Path, ratings: Path, kind: str, timed: bool, vocab: str, nproc: int,
             extra: list[str] = ()) -> dict:
    """Preprocess (vocab: the --vocab-from spec, or "all": every row, the old rule) and train
    one recipe; the test metrics."""
    schema = work / f"schema-{kind}.toml"
    schema.write_text(("" if timed else 'ignore = ["timestamp"]\n') + SCHEMA.format(
        label='kind = "regression"' if kind == "rating" else 'rule = ">= 4"',
        time=TIME if timed else ""))
    data = work / f"data-{kind}-{vocab.replace('*', 'all').replace(':', '-')}"
    if not data.exists():
        dlrm("preprocess", "--schema", str(schema), "--input", str(ratings), "--out", str(data),
             "--vocab-from", "*" if vocab == "all" else vocab)
        if vocab == "all":  # the rule before: a dataset that does not say what it counted
            manifest = json.loads((data / "manifest.json").read_text())
            del manifest["vocab_from"]
            (data / "manifest.json").write_text(json.dumps(manifest))
    recipe = "movielens_rating.toml" if kind == "rating" else "movielens.toml"
    run = work / f"run-{kind}-{len(list(work.glob('run-*')))}"
    t0 = time.perf_counter()
    done = dlrm("train", "--config", f"configs/{recipe}", f"--data.path={data}", "--run-dir",
                str(run), *SPLITS, *extra, nproc=nproc)["done"]
    key = "test_rmse" if kind == "rating" else "test_auc"
    return {key.removeprefix("test_"): done[key], "steps": done["steps"],
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--items", type=int, default=800)
    parser.add_argument("--ratings", type=int, default=40, help="per user, on average")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nproc", type=int, default=1, help="ranks of each dlrm run")
    parser.add_argument("--keep", default=None, help="keep the files here")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-baselines-"))
    work.mkdir(parents=True, exist_ok=True)
    planted = plant(work, args.users, args.items, args.ratings, args.seed)
    rows = planted["rows"]
    results = []
    for split in ("time", "random"):
        order = rows if split == "time" else [rows[i] for i in
                                              np.random.default_rng(1).permutation(len(rows))]
        folder = work / split
        folder.mkdir(exist_ok=True)
        for table in ("users.csv", "movies.csv"):
            shutil.copy(work / table, folder / table)
        ratings = folder / "ratings.csv"
        write_ratings(ratings, order)
        cut_train, cut_test = int(0.8 * len(order)), int(0.9 * len(order))
        train, test = order[:cut_train], order[cut_test:]
        seen = {u for u, *_ in train}
        new = sum(u not in seen for u, *_ in test) / len(test)
        timed = split == "time"  # random: no time column, the shuffled file is the order
        line = {"split": split, "rows": len(order), "test_rows_of_new_users": round(new, 3)}
        print(json.dumps({"event": "split", **line}), flush=True)
        for name, m in baselines(folder, train, test).items():
            results.append({**line, "model": name, **{k: round(v, 4) for k, v in m.items()}})
            print(json.dumps(results[-1]), flush=True)
        for kind, vocab, extra, name in [
                ("rating", "*[0:0.8]", [], "dlrm movielens_rating.toml"),
                ("rating", "all", [], "dlrm movielens_rating.toml, vocabulary of every row "
                                      "(the old rule)"),
                ("rating", "*[0:0.8]", ["--data.oov_dropout={}"],
                 "dlrm movielens_rating.toml without its oov_dropout"),
                ("click", "*[0:0.8]", [], "dlrm movielens.toml (rating >= 4)"),
                ("click", "all", [], "dlrm movielens.toml, vocabulary of every row (old rule)")]:
            m = run_dlrm(folder, ratings, kind, timed, vocab, args.nproc, extra)
            results.append({**line, "model": name, **m})
            print(json.dumps(results[-1]), flush=True)
    print("\n| split | model | test RMSE | test AUC (rating >= 4) |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['split']} | {r['model']} | {r.get('rmse', '')} | {r.get('auc', '')} |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

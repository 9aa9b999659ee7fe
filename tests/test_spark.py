"""``dlrm preprocess --engine spark`` on ``local[2]``: the dataset the single-host path
writes, file for file (the manifest but ``seconds`` and the engine's record), for Criteo
(vocab and hash), a declared schema with a time column and bags (vocab, hash, managed),
side tables with ``--vocab-from``, and ties of counts on both sides of 2^63; what it does
not run yet refused by name."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ML_HEADER, REPO, dataset_state, movielens_rows, quiet, write_csv

from dlrm.errors import PreprocessError
from dlrm.preprocess.driver import preprocess
from dlrm.rows.chunks import Options
from dlrm.rows.vocab import Encoding
from dlrm.schema.declared import SCHEMAS, load_schema
from dlrm.schema.manifest import load_manifest
from dlrm.synth.criteo import synth

pytest.importorskip("pyspark")  # installed by `make install` (dlrm[spark])
SPARK = ("local[2]", [])


@pytest.fixture(scope="module")
def session():
    """One Spark session for the module (its start-up is seconds); each run reuses it."""
    import os

    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = (SparkSession.builder.master(SPARK[0]).config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false").getOrCreate())
    yield spark
    spark.stop()


def _same(local: Path, spark: Path, master: str = SPARK[0]) -> None:
    a, b = dataset_state(local), dataset_state(spark)
    assert b["manifest"].pop("engine") == {"name": "spark", "master": master}
    assert "engine" not in a["manifest"]
    assert a["manifest"] == b["manifest"]
    assert a["files"] == b["files"]  # rejects and every other file, byte for byte
    assert a["tables"].keys() == b["tables"].keys() and a["tables"]
    for name in a["tables"]:
        assert (spark / name).read_bytes() == (local / name).read_bytes(), name


@pytest.mark.parametrize("encoding", [
    Encoding(type="hash", buckets=5000), Encoding(),
    Encoding(min_frequency=2, max_vocab=300)], ids=["hash", "vocab", "vocab_capped"])
def test_criteo_is_the_single_host_dataset(session, tmp_path, encoding):
    synth(tmp_path / "raw", days=3, rows_per_day=3000, seed=4)
    raw = [tmp_path / "raw" / f"day_{d}" for d in range(3)]
    with open(raw[1], "a") as f:  # bad rows: rejects with their lines, as on one host
        f.write("x\tnot a row\n")
    opts = Options(chunk_bytes=150_000)  # several chunks, so several Spark tasks per file
    for name, spark in (("local", None), ("spark", SPARK)):
        preprocess(raw, tmp_path / name, log=quiet, options=opts, spark=spark,
                   encoding=encoding)
    _same(tmp_path / "local", tmp_path / "spark")
    # A rerun finds its dataset.
    again = preprocess(raw, tmp_path / "spark", log=quiet, options=opts, spark=SPARK,
                       encoding=encoding)
    assert again.engine == {"name": "spark", "master": SPARK[0]}


@pytest.mark.parametrize("encoding", ["vocab", "hash", "managed"])
def test_a_declared_schema_with_time_and_bags_is_the_single_host_dataset(session, tmp_path,
                                                                          encoding):
    schema = load_schema(_schema(tmp_path, encoding))
    write_csv(tmp_path / "a.csv", ML_HEADER, movielens_rows(3000, 0))
    write_csv(tmp_path / "b.csv", ML_HEADER, movielens_rows(2000, 1, start=975_628_800
                                                            + 40 * 86_400))
    inputs = [tmp_path / "a.csv", tmp_path / "b.csv"]
    for name, spark in (("local", None), ("spark", SPARK)):
        preprocess(inputs, tmp_path / name, log=quiet, schema=schema, spark=spark,
                   options=Options(chunk_bytes=60_000))
    _same(tmp_path / "local", tmp_path / "spark")


def _schema(tmp: Path, encoding: str) -> Path:
    text = (SCHEMAS / "movielens.toml").read_text().replace('encoding = "vocab"', {
        "vocab": 'encoding = "vocab"', "hash": 'encoding = "hash"\nbuckets = 4096',
        "managed": 'encoding = "managed"\nsize = 512'}[encoding])
    path = tmp / f"movielens_{encoding}.toml"
    path.write_text(text)
    return path


JOINED = """
[input]
format = "csv"
header = true
[label]
column = "click"
[categorical]
columns = ["user", "item", "tag", "city"]
values = "hex"
[[join]]
file = "users.csv"
key = "user"
columns = ["city"]
[time]
column = "t"
format = "unix"
period = "day"
"""
TIES = [(1 << 63) - 1, 1 << 63, (1 << 63) + 5, (1 << 64) - 1, 3]  # each counted 7 times


def test_side_tables_vocab_from_and_ties_above_2_63_are_the_single_host_dataset(
        session, tmp_path):
    rng = np.random.default_rng(0)
    with open(tmp_path / "log.csv", "w") as f:
        f.write("click,user,item,tag,t\n")
        rows = [(int(rng.integers(0, 2)), int(rng.integers(0, 300)),
                 int(rng.integers(0, 1 << 64, dtype=np.uint64)) >> int(rng.integers(0, 60)))
                for _ in range(4000)]
        ties = [v for v in TIES for _ in range(7)]
        for i, (click, user, item) in enumerate(rows):
            tag = ties[i] if i < len(ties) else int(rng.integers(0, 50))
            f.write(f"{click},{user:x},{item:016x},{tag:x},{1_000_000_000 + 60 * i}\n")
    with open(tmp_path / "users.csv", "w") as f:
        f.write("user,city\n")
        for u in range(0, 280):  # the last users are in no table
            f.write(f"{u:x},{u % 17:x}\n")
    (tmp_path / "schema.toml").write_text(JOINED)
    schema = load_schema(tmp_path / "schema.toml")
    for name, spark in (("local", None), ("spark", SPARK)):
        preprocess([tmp_path / "log.csv"], tmp_path / name, log=quiet, schema=schema,
                   spark=spark, vocab_from=["*[0:0.8]"], options=Options(chunk_bytes=40_000))
    _same(tmp_path / "local", tmp_path / "spark")
    manifest = load_manifest(tmp_path / "spark")
    assert manifest.joins[0]["rows_without_match"] > 0
    with np.load(tmp_path / "spark" / "vocab.npz") as z:
        tags = z["tag"].tolist()
    # The tied values, in unsigned order, after the tags counted more often.
    assert [t for t in tags if t in TIES] == sorted(TIES)
    assert tags.index(3) < tags.index((1 << 63) - 1) < tags.index(1 << 63)


def test_what_spark_does_not_run_yet_is_refused_by_name(tmp_path):
    synth(tmp_path / "raw", days=2, rows_per_day=200, seed=4)
    raw = [tmp_path / "raw" / "day_0"]
    preprocess(raw, tmp_path / "base", log=quiet)
    cases = [
        (dict(like=tmp_path / "base"), "--like is not built for Spark"),
        (dict(like=tmp_path / "base", grow=True), "--grow is not built for Spark"),
        (dict(encoding=Encoding(type="hash"), options=Options(memory_gib=1)), "--memory-gib"),
    ]
    for kwargs, says in cases:
        with pytest.raises(PreprocessError, match=says):
            preprocess(raw, tmp_path / "out", log=quiet, spark=SPARK, **kwargs)
    hashed = tmp_path / "hashed"
    preprocess(raw, hashed, log=quiet, encoding=Encoding(type="hash", buckets=100))
    with pytest.raises(PreprocessError, match="--like is not built for Spark"):
        preprocess(raw, tmp_path / "out", log=quiet, spark=SPARK, like=hashed)
    proc = subprocess.run([sys.executable, "-m", "dlrm", "preprocess", "--input", str(raw[0]),
                           "--out", str(tmp_path / "cli"), "--engine", "spark", "--like",
                           str(tmp_path / "base")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "--engine spark: --like is not built" in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "cli").exists()


def test_a_task_killed_midway_is_retried_and_the_dataset_is_the_same(tmp_path):
    """``local[2,3]`` (plain local mode never retries): the Python worker writing a chunk's
    shard is SIGKILLed while its temporary file exists; Spark retries the task, and the
    dataset is the single-host one. A run of its own: a session's master is fixed."""
    synth(tmp_path / "raw", days=2, rows_per_day=25_000, seed=5)
    raw = [str(tmp_path / "raw" / f"day_{d}") for d in range(2)]
    args = ["preprocess", "--input", *raw, "--encoding", "hash", "--buckets", "5000",
            "--chunk-mb", "0.5"]
    subprocess.run([sys.executable, "-m", "dlrm", *args, "--out", str(tmp_path / "local")],
                   cwd=REPO, check=True, capture_output=True)
    out = tmp_path / "spark"
    proc = subprocess.Popen([sys.executable, "-m", "dlrm", *args, "--out", str(out),
                             "--engine", "spark", "--spark-master", "local[2,3]"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    killed = None
    while killed is None and proc.poll() is None:
        for tmp in out.rglob("*.tmp"):  # a shard being written: NAME.parquet.PID.tmp
            found = re.search(r"\.parquet\.(\d+)\.tmp$", tmp.name)
            if found and int(found[1]) != proc.pid:
                killed = int(found[1])
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.002)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert killed is not None, "no shard was seen being written"
    assert "Python worker exited unexpectedly" in stderr  # Spark saw the task die
    assert re.search(r"Lost task [\d.]+ in stage", stderr)
    _same(tmp_path / "local", out, master="local[2,3]")

"""``dlrm preprocess --engine spark`` on ``local[2]``: the dataset the single-host path
writes, file for file (the manifest but ``seconds`` and the engine's record), for Criteo
(hash) and a declared schema with a time column and bags; what it does not run yet refused
by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ML_HEADER, REPO, dataset_state, movielens_rows, quiet, write_csv

from dlrm.errors import PreprocessError
from dlrm.preprocess.driver import preprocess
from dlrm.rows.chunks import Options
from dlrm.rows.vocab import Encoding
from dlrm.schema.declared import SCHEMAS, load_schema
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


def _same(local: Path, spark: Path) -> None:
    a, b = dataset_state(local), dataset_state(spark)
    assert b["manifest"].pop("engine") == {"name": "spark", "master": SPARK[0]}
    assert "engine" not in a["manifest"]
    assert a["manifest"] == b["manifest"]
    assert a["files"] == b["files"]  # rejects and every other file, byte for byte
    assert a["tables"].keys() == b["tables"].keys() and a["tables"]
    for name in a["tables"]:
        assert (spark / name).read_bytes() == (local / name).read_bytes(), name


def test_criteo_hash_is_the_single_host_dataset(session, tmp_path):
    synth(tmp_path / "raw", days=3, rows_per_day=3000, seed=4)
    raw = [tmp_path / "raw" / f"day_{d}" for d in range(3)]
    with open(raw[1], "a") as f:  # bad rows: rejects with their lines, as on one host
        f.write("x\tnot a row\n")
    opts = Options(chunk_bytes=150_000)  # several chunks, so several Spark tasks per file
    for name, spark in (("local", None), ("spark", SPARK)):
        preprocess(raw, tmp_path / name, log=quiet, options=opts, spark=spark,
                   encoding=Encoding(type="hash", buckets=5000))
    _same(tmp_path / "local", tmp_path / "spark")
    # A rerun finds its dataset.
    again = preprocess(raw, tmp_path / "spark", log=quiet, options=opts, spark=SPARK,
                       encoding=Encoding(type="hash", buckets=5000))
    assert again.engine == {"name": "spark", "master": SPARK[0]}


def test_a_declared_schema_with_time_and_bags_is_the_single_host_dataset(session, tmp_path):
    schema = load_schema(_schema(tmp_path))
    write_csv(tmp_path / "a.csv", ML_HEADER, movielens_rows(3000, 0))
    write_csv(tmp_path / "b.csv", ML_HEADER, movielens_rows(2000, 1, start=975_628_800
                                                            + 40 * 86_400))
    inputs = [tmp_path / "a.csv", tmp_path / "b.csv"]
    for name, spark in (("local", None), ("spark", SPARK)):
        preprocess(inputs, tmp_path / name, log=quiet, schema=schema, spark=spark,
                   options=Options(chunk_bytes=60_000))
    _same(tmp_path / "local", tmp_path / "spark")


def _schema(tmp: Path) -> Path:
    text = (SCHEMAS / "movielens.toml").read_text().replace(
        'encoding = "vocab"', 'encoding = "hash"\nbuckets = 4096')
    path = tmp / "movielens_hash.toml"
    path.write_text(text)
    return path


def test_what_spark_does_not_run_yet_is_refused_by_name(tmp_path):
    synth(tmp_path / "raw", days=2, rows_per_day=200, seed=4)
    raw = [tmp_path / "raw" / "day_0"]
    preprocess(raw, tmp_path / "base", log=quiet)
    cases = [
        (dict(), "the vocab encoding's counting pass"),
        (dict(like=tmp_path / "base"), "the vocab encoding's counting pass"),
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
                           "--out", str(tmp_path / "cli"), "--engine", "spark"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--engine spark: the vocab encoding" in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "cli").exists()

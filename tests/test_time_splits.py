"""A schema's time column: the dataset laid out by period, each in time order (sorted
where the log is not), splits that name periods or fractions of the whole, bad times
rejected by line, and a run killed while it sorts resumed to the same dataset."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import REPO, quiet, read_units

from dlrm.errors import SchemaError
from dlrm.preprocess.driver import Options, preprocess
from dlrm.schema.declared import load_schema
from dlrm.schema.manifest import load_manifest
from dlrm.schema.periods import format_times, parse_times, period_keys, period_name
from dlrm.schema.splits import default_split_specs, resolve_split

DAY = 86_400
T0 = 1_413_849_600  # 2014-10-21 00:00 UTC

SCHEMA = """
[input]
format = "csv"
header = true

[label]
column = "click"

[dense]
columns = ["x"]
transform = "standardize"

[categorical]
columns = ["row", "user"]

[time]
column = "ts"
format = "{format}"
period = "{period}"
"""


def _schema(tmp_path, period="day", fmt="unix"):
    path = tmp_path / f"schema_{period}.toml"
    path.write_text(SCHEMA.format(period=period, format=fmt))
    return load_schema(path)


def _log(path, rows, times, fmt="unix", bad=()):
    """A CSV log: ``row`` numbers each line's row (its vocab id is its rank + 2, where the
    vocabularies count every row: --vocab-from '*')."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["click", "x", "ts", "user", "row"])
        for r, t in zip(rows, format_times(times, fmt), strict=True):
            w.writerow([int(r % 3 == 0), r % 7, t, f"u{r % 11}", r])
        for line in bad:
            f.write(line + "\n")


def _table(root, manifest, unit=None):
    return read_units(root, manifest.periods if unit is None else [unit])


def _rows_and_times(table):
    return (table.column("row").to_numpy() - 2,
            table.column("ts").cast(pa.int64()).to_numpy() // 1000)  # stored in ms


@pytest.fixture(scope="module")
def shuffled(tmp_path_factory):
    """6 days of rows in no time order, many at the same second, in two files; preprocessed
    in small chunks by 2 workers."""
    root = tmp_path_factory.mktemp("shuffled")
    rng = np.random.default_rng(0)
    n = 6000
    times = T0 + rng.integers(0, 6 * DAY // 60, n) * 60  # 60-second steps: many ties
    _log(root / "a.csv", range(n // 2), times[: n // 2])
    _log(root / "b.csv", range(n // 2, n), times[n // 2:])
    logged = []
    manifest = preprocess([root / "a.csv", root / "b.csv"], root / "data", log=logged.append,
                          schema=_schema(root), vocab_from=["*"],
                          options=Options(workers=2, chunk_bytes=20_000, block_bytes=4096))
    return root, times, manifest, logged


def test_periods_in_time_order_hold_every_row_once(shuffled):
    root, times, manifest, logged = shuffled
    names = [period_name(int(k), "day") for k in np.unique(period_keys(times, "day"))]
    assert [p["name"] for p in manifest.periods] == names == [
        "2014-10-21", "2014-10-22", "2014-10-23", "2014-10-24", "2014-10-25", "2014-10-26"]
    assert sum("sorting" in line for line in logged) == 6  # no period came in order
    rows, got = _rows_and_times(_table(root / "data", manifest))
    # Every row once, by time; rows of the same second in input order (a stable sort).
    assert rows.tolist() == np.lexsort((np.arange(times.size), times)).tolist()
    assert (got == times[rows]).all()
    for p in manifest.periods:
        rows, got = _rows_and_times(_table(root / "data", manifest, p))
        assert {period_name(int(k), "day") for k in period_keys(got, "day")} == {p["name"]}
        assert (p["first"], p["last"], p["rows_accepted"]) == (got.min(), got.max(), rows.size)
        assert all(f["path"].startswith(f"data/{p['name']}/sorted-") for f in p["files"])
    assert "files" not in manifest.sources[0]  # the periods hold the files
    assert manifest.schema["time"]["column"] == "ts"
    assert sorted(p.name for p in (root / "data" / "data").iterdir()) == names  # no leftovers
    assert sum(1 for _ in (root / "data" / "data").rglob("*.parquet")) == 6


def test_default_split_is_the_last_period_halved_by_time(shuffled):
    root, times, manifest, _ = shuffled
    specs = default_split_specs(manifest)
    assert specs == {"train": ["2014-10-21", "2014-10-22", "2014-10-23", "2014-10-24",
                               "2014-10-25"],
                     "val": ["2014-10-26[0:0.5]"], "test": ["2014-10-26[0.5:1]"]}
    split_times = {}
    for split, spec in specs.items():
        segments = resolve_split(root / "data", manifest, spec)
        split_times[split] = np.concatenate([
            pq.read_table(s.path).column("ts").cast(pa.int64()).to_numpy()[s.start:s.stop]
            for s in segments])
    assert sum(t.size for t in split_times.values()) == times.size
    assert split_times["train"].max() < split_times["val"].min()
    assert split_times["val"].max() <= split_times["test"].min()
    # The standardized feature's statistics come from the training periods.
    stats = manifest.schema["standardize"]["x"]
    assert stats["sources"] == specs["train"] and stats["rows"] == split_times["train"].size
    train_rows = np.flatnonzero(times < T0 + 5 * DAY)
    assert stats["mean"] == pytest.approx((train_rows % 7).mean())


def test_star_names_the_whole_dataset_in_time_order(shuffled):
    root, times, manifest, _ = shuffled
    last_tenth = resolve_split(root / "data", manifest, ["*[0.9:1]"])
    assert sum(s.stop - s.start for s in last_tenth) == times.size - int(0.9 * times.size)
    first = resolve_split(root / "data", manifest, ["*[0:0.9]"])
    assert sum(s.stop - s.start for s in first) == int(0.9 * times.size)
    with pytest.raises(ValueError, match=r"periods \['2014-10-21'"):
        resolve_split(root / "data", manifest, ["day_0"])


def test_a_log_in_time_order_is_kept_as_written(tmp_path):
    times = T0 + np.arange(4000) * 60  # 2.8 days, in order
    _log(tmp_path / "log.csv", range(4000), times, fmt="%Y-%m-%d %H:%M:%S")
    logged = []
    manifest = preprocess([tmp_path / "log.csv"], tmp_path / "data", log=logged.append,
                          schema=_schema(tmp_path, fmt="%Y-%m-%d %H:%M:%S"), vocab_from=["*"],
                          options=Options(workers=2, chunk_bytes=30_000))
    assert not any("sorting" in line for line in logged)
    assert [p["rows_accepted"] for p in manifest.periods] == [1440, 1440, 1120]
    assert all("/log-" in f["path"] for p in manifest.periods for f in p["files"])
    rows, got = _rows_and_times(_table(tmp_path / "data", manifest))
    assert rows.tolist() == list(range(4000)) and (got == times).all()


def test_bad_times_are_rejected_by_line_and_the_rest_kept(tmp_path):
    times = T0 + np.arange(50) * 3600
    _log(tmp_path / "log.csv", range(50), times, bad=[
        "1,2,,u1,50", "1,2,yesterday,u1,51", "1,2,1.5e9,u1,52", "1,2,1413849600,u1,53"])
    _log(tmp_path / "only_bad.csv", [], np.zeros(0, np.int64), bad=["1,2,never,u1,60"])
    manifest = preprocess([tmp_path / "log.csv", tmp_path / "only_bad.csv"], tmp_path / "data",
                          log=quiet, schema=_schema(tmp_path), vocab_from=["*"])
    assert manifest.rejected_by_reason == {"bad_time": 4}
    assert manifest.rows_accepted == 51 and manifest.sources[1]["rows_accepted"] == 0
    rejects = (tmp_path / "data" / "rejects" / "log.tsv").read_text().splitlines()
    assert [r.split("\t")[:2] for r in rejects] == [["52", "bad_time"], ["53", "bad_time"],
                                                    ["54", "bad_time"]]
    rows, got = _rows_and_times(_table(tmp_path / "data", manifest))
    # Line 55 (row 53, the 51st value: id rank 50) has row 0's time: it follows row 0.
    assert rows[0] == 0 and rows[1] == 50


def test_parquet_timestamps_give_the_same_dataset_as_csv_text(tmp_path):
    rng = np.random.default_rng(1)
    times = T0 + rng.integers(0, 14 * DAY, 500)
    _log(tmp_path / "log.csv", range(500), times, fmt="%Y-%m-%d %H:%M:%S")
    pq.write_table(pa.table({
        "click": [r % 3 == 0 for r in range(500)], "x": [r % 7 for r in range(500)],
        "ts": pa.array(times * 1000, pa.timestamp("ms")), "user": [f"u{r % 11}" for r in
                                                                   range(500)],
        "row": list(range(500))}), tmp_path / "log.parquet")
    text = SCHEMA.format(period="week", format="unix").replace('format = "csv"',
                                                               'format = "parquet"')
    (tmp_path / "pq.toml").write_text(text.replace("header = true\n", ""))
    parquet = preprocess([tmp_path / "log.parquet"], tmp_path / "from_parquet", log=quiet,
                         schema=load_schema(tmp_path / "pq.toml"))
    csv_ = preprocess([tmp_path / "log.csv"], tmp_path / "from_csv", log=quiet,
                      schema=_schema(tmp_path, "week", "%Y-%m-%d %H:%M:%S"))
    assert [p["name"] for p in parquet.periods] == [p["name"] for p in csv_.periods] == [
        "2014-W43", "2014-W44", "2014-W45"]
    assert _table(tmp_path / "from_parquet", parquet).equals(_table(tmp_path / "from_csv", csv_))


def test_period_names_and_time_formats():
    t = np.array([T0 + 3 * 3600 + 59, 1_419_811_200, 1_420_070_399])  # 2014-12-29, 12-31
    assert [period_name(int(k), "hour") for k in period_keys(t, "hour")] == [
        "2014-10-21T03", "2014-12-29T00", "2014-12-31T23"]
    assert [period_name(int(k), "week") for k in period_keys(t, "week")] == [
        "2014-W43", "2015-W01", "2015-W01"]  # ISO weeks begin on Monday
    assert [period_name(int(k), "month") for k in period_keys(t, "month")] == [
        "2014-10", "2014-12", "2014-12"]
    seconds, ok = parse_times(pa.array(["1413849600500", "-1500", "", "12a"]), "unix_ms")
    assert seconds[:2].tolist() == [T0, -2] and ok.tolist() == [True, True, False, False]
    seconds, ok = parse_times(pa.array(["14102103", "14102199"]), "%y%m%d%H")
    assert seconds[0] == T0 + 3 * 3600 and ok.tolist() == [True, False]
    assert format_times(seconds[:1], "%y%m%d%H") == ["14102103"]


@pytest.mark.parametrize("text, key", [
    ('[time]\ncolumn = "ts"\nperiod = "year"\n', "time.period"),
    ('[time]\nformat = "unix"\n', "time.column"),
    ('[time]\ncolumn = "user"\n', "declared more than once"),
    ('[time]\ncolumn = "ts"\nzone = "UTC"\n', "unknown key zone"),
])
def test_time_schema_errors_name_the_key(tmp_path, text, key):
    base = SCHEMA[:SCHEMA.index("[time]")]
    path = tmp_path / "s.toml"
    path.write_text(base + text)
    with pytest.raises(SchemaError, match=key):
        load_schema(path)


def test_sigkill_while_sorting_periods_then_rerun_equals_uninterrupted(tmp_path):
    """Hourly periods of a shuffled log: killed once some periods are sorted and recorded,
    the rerun sorts the rest, none of the recorded ones twice, and the dataset equals an
    uninterrupted run's."""
    rng = np.random.default_rng(2)
    times = T0 + rng.integers(0, 10 * DAY, 60_000)
    _log(tmp_path / "log.csv", range(times.size), times)
    schema = tmp_path / "schema_hour.toml"
    _schema(tmp_path, "hour")
    args = ["--schema", str(schema), "--input", str(tmp_path / "log.csv"), "--workers", "1"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    whole = tmp_path / "whole"
    log = subprocess.run([sys.executable, "-m", "dlrm", "preprocess", *args, "--out",
                          str(whole)], check=True, env=env, cwd=REPO, capture_output=True,
                         text=True).stdout
    everyone = set(re.findall(r"period (\S+) is not in time order; sorting", log))
    assert len(everyone) == 240, log  # shuffled: every period is sorted
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "dlrm", "preprocess", *args, "--out", str(killed)]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    records = killed / "_work" / "periods"
    deadline = time.time() + 300
    while not (records.is_dir() and any(records.iterdir())) and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    recorded = {p.name.removesuffix(".json") for p in records.iterdir() if ".tmp" not in p.name}
    assert 0 < len(recorded) < 240 and not (killed / "manifest.json").exists()
    log = subprocess.run(cmd, check=True, env=env, cwd=REPO, capture_output=True,
                         text=True).stdout
    sorted_again = re.findall(r"period (\S+) is not in time order; sorting", log)
    assert len(sorted_again) == len(set(sorted_again))  # each once
    assert set(sorted_again) == everyone - recorded  # not the ones sorted before the kill
    a = load_manifest(whole)
    b = load_manifest(killed)
    assert [p["files"] for p in a.periods] == [p["files"] for p in b.periods]
    assert len(a.periods) == 240
    assert _table(whole, a).equals(_table(killed, b))
    assert not (killed / "_work").exists()
    assert sum(1 for _ in (killed / "data").rglob("*.parquet")) == 240

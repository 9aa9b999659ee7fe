"""Vocab counting in bounded memory: counting (spilled in runs) and merging the counts
under a budget far below the size of the distinct values give the dataset an unbudgeted
run gives, byte for byte and id for id; killed (SIGKILL, driver and workers) in the
middle of the partitioned merge, the rerun finishes the same dataset."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pytest
from helpers import REPO, dataset_state, dlrm, quiet

from dlrm.preprocess.driver import preprocess
from dlrm.preprocess.pool import Pool
from dlrm.rows.chunks import Options
from dlrm.rows.vocab import Encoding
from dlrm.synth.criteo import synth

BUDGET_GIB = 0.0001  # ~105 KiB, shared by the 2 workers


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("budget")
    synth(root, days=2, rows_per_day=30_000, seed=9)
    with open(root / "day_1", "a") as f:  # rejects are part of the dataset compared
        f.write("x\t1\n" + "1\t" * 39 + "zz\n")
    return [str(root / f"day_{d}") for d in range(2)]


def _args(raw: list[str], out: Path, *more: str) -> list[str]:
    # min_frequency 2 and a cap: the partitions filter, and the order cuts within a count.
    return ["preprocess", "--input", *raw, "--out", str(out), "--workers", "2",
            "--chunk-mb", "0.5", "--min-frequency", "2", "--max-vocab", "3000", *more]


@pytest.fixture(scope="module")
def whole(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "data"
    log = dlrm(*_args(raw, out)).stdout
    assert "in 26 partitions" in log  # one per feature: the budget is no constraint
    return out


def _distinct_values(raw: list[str]) -> int:
    """Distinct categorical values of the inputs, per feature, summed."""
    names = ["label", *(f"I{i}" for i in range(1, 14)), *(f"C{i}" for i in range(1, 27))]
    table = pa.concat_tables(pacsv.read_csv(
        p, read_options=pacsv.ReadOptions(column_names=names),
        parse_options=pacsv.ParseOptions(delimiter="\t", invalid_row_handler=lambda _: "skip"),
        convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string())))
        for p in raw)
    return sum(pc.count_distinct(table[c]).as_py() for c in names if c.startswith("C"))


def test_a_small_budget_gives_the_same_dataset(raw, whole, tmp_path):
    distinct = _distinct_values(raw)
    assert BUDGET_GIB * 2**30 < distinct * 8 / 4, distinct  # far below the values alone

    log = dlrm(*_args(raw, tmp_path / "small", "--memory-gib", str(BUDGET_GIB))).stdout
    parts = int(log.split(" partitions")[0].rsplit(" ", 1)[1])
    assert parts > 10 * 26, log
    assert dataset_state(tmp_path / "small") == dataset_state(whole)


def test_counting_spills_runs_under_a_small_budget_and_gives_the_same_dataset(raw, tmp_path):
    """Read in 64 KiB blocks, a chunk's counts outgrow the budget's share and are spilled
    as sorted runs, several per chunk; the merge reads them all alike."""
    options = {"workers": 2, "chunk_bytes": 1 << 20, "block_bytes": 64 << 10}
    encoding = Encoding(min_frequency=2, max_vocab=3000)
    preprocess(raw, tmp_path / "whole", encoding=encoding, log=quiet, options=Options(**options))
    said: list[str] = []
    preprocess(raw, tmp_path / "spilled", encoding=encoding, log=said.append,
               options=Options(**options, memory_gib=BUDGET_GIB))
    runs, chunks = map(int, re.search(r"\((\d+) runs of (\d+) chunks\)", "".join(said)).groups())
    assert runs > 3 * chunks, said
    assert dataset_state(tmp_path / "spilled") == dataset_state(tmp_path / "whole")


def test_sigkill_in_the_merge_then_rerun_gives_the_same_dataset(raw, whole, tmp_path,
                                                               monkeypatch):
    """The rerun merges only the partitions the killed run had not written: it counts no
    chunk again and the dataset equals an uninterrupted run's."""
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "dlrm",
                             *_args(raw, killed, "--memory-gib", str(BUDGET_GIB))],
                            cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    vocab = killed / "_work" / "vocab"

    def merged() -> int:  # partitions whose file is written (a temporary one is not)
        return len([p for p in vocab.glob("*/*.npz") if ".tmp" not in p.name])

    deadline = time.time() + 120
    while time.time() < deadline and merged() < 20:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = merged()
    assert 20 <= done and not (killed / "_work" / "tables").exists(), done
    assert not (killed / "manifest.json").exists()

    # The rerun in this process (the flags of _args), each pass's jobs seen on their way
    # to the worker pool.
    jobs: dict[str, int] = {}
    real = Pool.run

    def spy(pool, fn, tasks, *args, **kwargs):
        jobs[fn.__name__] = jobs.get(fn.__name__, 0) + len(tasks)
        return real(pool, fn, tasks, *args, **kwargs)

    monkeypatch.setattr(Pool, "run", spy)
    said: list[str] = []
    preprocess(raw, killed, encoding=Encoding(type="vocab", min_frequency=2, max_vocab=3000),
               log=said.append, options=Options(workers=2, chunk_bytes=1 << 19,
                                                memory_gib=BUDGET_GIB))
    assert any("resuming" in line for line in said), said
    partitions = int(re.search(r" in (\d+) partitions", "".join(said)).group(1))
    assert partitions > done, said
    assert jobs.get("count_chunk", 0) == 0, jobs
    assert jobs["merge_partition"] == partitions - done, (jobs, done, said)
    assert dataset_state(killed) == dataset_state(whole)


def test_a_negative_budget_is_refused_naming_the_flag(raw, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dlrm", *_args(raw, tmp_path / "out",
                                                                "--memory-gib", "-1")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "--memory-gib" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


# One feature of 4M distinct values (a 40 MB CSV): its unbudgeted merge needs far more
# than a worker's parse-and-write memory, so that the budget is what bounds the peak.
MEMORY_ROWS = 4_000_000
MEMORY_GIB = 0.0625  # 64 MiB, 32 MiB each of the 2 workers: about 11 partitions
WORKER_MIB = 340  # docs/data.md: "about 340 MiB peak per worker" (--encoding hash)
_PEAK = ("import json, resource, subprocess, sys; p = subprocess.run(sys.argv[1:], "
         "capture_output=True, text=True); print(json.dumps({'rc': p.returncode, 'log': "
         "p.stdout + p.stderr, 'kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")


def _peak_mib(csv: Path, schema: Path, out: Path, *more: str) -> tuple[float, str]:
    """`dlrm preprocess` (2 workers) run from a fresh process: the peak RSS of the largest
    process of its tree (the driver and its workers, each waited for), and its log."""
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK, sys.executable, "-m", "dlrm", "preprocess", "--schema",
         str(schema), "--input", str(csv), "--out", str(out), "--workers", "2",
         "--chunk-mb", "4", "--max-vocab", "1000", *more],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=300)
    result = json.loads(proc.stdout)
    assert result["rc"] == 0, result["log"][-5000:]
    return result["kib"] / 1024, result["log"]


def test_the_budget_bounds_the_workers_peak_memory(tmp_path):
    """docs/data.md: a worker peaks at about 340 MiB (--encoding hash), plus for vocab what it
    counts, and the merge keeps to --memory-gib. So no process of a vocab run under a
    64 MiB budget (32 MiB a worker) peaks above the hash run's peak on the same data plus
    that share plus 16 MiB, while the same run under a budget above the data (one
    partition of 3.4M values) peaks well above. Measured, peak RSS of the largest process
    over 3 runs: hash 307-313 MiB, budgeted 293-307 (0-13 MiB below hash), unbudgeted
    438-439."""
    rng = np.random.default_rng(0)
    csv, schema = tmp_path / "in.csv", tmp_path / "s.toml"
    with open(csv, "wb") as f:
        f.write(b"y,a\n")
        pacsv.write_csv(pa.table({"y": rng.integers(0, 2, MEMORY_ROWS),
                                  "a": rng.permutation(MEMORY_ROWS) + 10**6}), f,
                        pacsv.WriteOptions(include_header=False))
    schema.write_text('[input]\nformat = "csv"\nheader = true\n[label]\ncolumn = "y"\n'
                      '[categorical]\ncolumns = ["a"]\n')

    hashed, _ = _peak_mib(csv, schema, tmp_path / "hash", "--encoding", "hash",
                          "--buckets", "1000")
    budgeted, log = _peak_mib(csv, schema, tmp_path / "budget", "--memory-gib", str(MEMORY_GIB))
    assert int(re.search(r" in (\d+) partitions", log).group(1)) > 5, log  # it partitions
    unbudgeted, log = _peak_mib(csv, schema, tmp_path / "whole", "--memory-gib", "8")
    assert " in 1 partitions" in log, log
    share = MEMORY_GIB * 1024 / 2
    peaks = {"hash": hashed, "budgeted": budgeted, "unbudgeted": unbudgeted}
    assert hashed <= 1.1 * WORKER_MIB, peaks
    assert budgeted <= hashed + share + 16, peaks
    assert unbudgeted > budgeted + 2 * share, peaks  # the budget, not the data, bounds it

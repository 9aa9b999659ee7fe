"""`dlrm preprocess`, or the loader, of this checkout against another commit's, side by side.

Run:  .venv/bin/python scripts/bench_against.py --ref COMMIT [--days 4] [--rows-per-day 1000000]
      [--repeats 3] [--workers 0] [--job preprocess|loader] [-- extra preprocess flags]

Writes Criteo-format day files once (`dlrm synth`), checks COMMIT out into a temporary git
worktree, then runs `dlrm preprocess` of the same files with each code base in turn (A, B,
A, B, ...: the VM's speed drifts within minutes, so neither gets the quiet stretch), each
into a fresh directory, with this checkout's virtual environment. Prints each run's wall
seconds and rows/s, the medians and the ratio (this checkout / COMMIT). The datasets
need not be equal: what a run counts may differ between the two (since issue 24, the
vocabularies count the training days only).

``--job loader``: the days are preprocessed once (this checkout), then each code base's
``ParquetBatches`` reads every row of the dataset (one rank, batches of 2048, no prefetch
thread, the manifest's cardinalities given: since issue 25 they check every id, and every
page read checks its checksum) in a fresh process; samples/s instead of rows/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def preprocess(code: Path, inputs: list[Path], out: Path, workers: int, extra: list[str]) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dlrm", "preprocess", "--input", *map(str, inputs),
                    "--out", str(out), "--workers", str(workers), *extra],
                   cwd=code, env={**os.environ, "PYTHONPATH": str(code)},
                   check=True, capture_output=True)
    return time.perf_counter() - t0


LOADER = """
import sys, time
from dlrm.data.loader import ParquetBatches
data = sys.argv[1]
try:  # the packages by job (issue 26)
    from dlrm.schema.manifest import load_manifest
    from dlrm.schema.splits import resolve_split
    m = load_manifest(data)
    features, cardinalities = m.features, m.cardinalities
except ImportError:  # older commits: two flat folders, the manifest a dict
    from dlrm.data.preprocess import load_manifest
    from dlrm.data.schema import Features
    from dlrm.data.splits import resolve_split
    m = load_manifest(data)
    features, cardinalities = m.features, m["cardinalities"]
batches = ParquetBatches(resolve_split(data, m, ["*"]), 2048, 0, 1, prefetch=0,
                         features=features, cardinalities=cardinalities)
t0 = time.perf_counter()
n = sum(len(b.labels) for b in batches)
print(n, time.perf_counter() - t0)
"""


def load(code: Path, data: Path) -> tuple[int, float]:
    """(samples, seconds) of one pass of ``code``'s loader over ``data``."""
    out = subprocess.run([sys.executable, "-c", LOADER, str(data)], cwd=code,
                         env={**os.environ, "PYTHONPATH": str(code)}, check=True,
                         capture_output=True, text=True).stdout.split()
    return int(out[-2]), float(out[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", required=True)
    parser.add_argument("--days", type=int, default=4)
    parser.add_argument("--rows-per-day", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--job", choices=["preprocess", "loader"], default="preprocess")
    parser.add_argument("extra", nargs="*", help="more preprocess flags, after --")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-against-"))
    try:
        subprocess.run([sys.executable, "-m", "dlrm", "synth", "--out", str(work / "raw"),
                        "--days", str(args.days), "--rows-per-day", str(args.rows_per_day)],
                       cwd=ROOT, check=True, capture_output=True)
        inputs = sorted((work / "raw").glob("day_*"))
        ref = work / "ref"
        subprocess.run(["git", "worktree", "add", "--detach", str(ref), args.ref], cwd=ROOT,
                       check=True, capture_output=True)
        rows = args.days * args.rows_per_day
        if args.job == "loader":
            preprocess(ROOT, inputs, work / "data", args.workers, args.extra)
        times: dict[str, list[float]] = {"this": [], "ref": []}
        for i in range(args.repeats):
            for name, code in (("ref", ref), ("this", ROOT)) if i % 2 else \
                    (("this", ROOT), ("ref", ref)):
                if args.job == "loader":
                    rows, s = load(code, work / "data")
                else:
                    s = preprocess(code, inputs, work / f"out-{name}", args.workers, args.extra)
                times[name].append(s)
                print(json.dumps({"event": "run", "job": args.job, "code": name,
                                  "seconds": round(s, 2),
                                  "rows_per_sec": round(rows / s)}), flush=True)
        this, other = (statistics.median(times[k]) for k in ("this", "ref"))
        print(json.dumps({"event": "result", "job": args.job, "ref": args.ref, "rows": rows,
                          "median_seconds_this": round(this, 2),
                          "median_seconds_ref": round(other, 2),
                          "ratio_this_over_ref": round(this / other, 3)}))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(work / "ref")], cwd=ROOT,
                       capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

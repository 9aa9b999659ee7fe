"""`dlrm preprocess` of this checkout against another commit's, side by side in one run.

Run:  .venv/bin/python scripts/bench_against.py --ref COMMIT [--days 4] [--rows-per-day 1000000]
      [--repeats 3] [--workers 0] [-- extra preprocess flags]

Writes Criteo-format day files once (`dlrm synth`), checks COMMIT out into a temporary git
worktree, then runs `dlrm preprocess` of the same files with each code base in turn (A, B,
A, B, ...: the VM's speed drifts within minutes, so neither gets the quiet stretch), each
into a fresh directory, with this checkout's virtual environment. Prints each run's wall
seconds and rows/s, the medians and the ratio (this checkout / COMMIT). The datasets
need not be equal: what a run counts may differ between the two (since issue 24, the
vocabularies count the training days only).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", required=True)
    parser.add_argument("--days", type=int, default=4)
    parser.add_argument("--rows-per-day", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0)
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
        times: dict[str, list[float]] = {"this": [], "ref": []}
        for i in range(args.repeats):
            for name, code in (("ref", ref), ("this", ROOT)) if i % 2 else \
                    (("this", ROOT), ("ref", ref)):
                s = preprocess(code, inputs, work / f"out-{name}", args.workers, args.extra)
                times[name].append(s)
                print(json.dumps({"event": "run", "code": name, "seconds": round(s, 2),
                                  "rows_per_sec": round(rows / s)}), flush=True)
        this, other = (statistics.median(times[k]) for k in ("this", "ref"))
        print(json.dumps({"event": "result", "ref": args.ref, "rows": rows,
                          "median_seconds_this": round(this, 2),
                          "median_seconds_ref": round(other, 2),
                          "ratio_this_over_ref": round(this / other, 3)}))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(work / "ref")], cwd=ROOT,
                       capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Benchmark the declared-schema text path: `dlrm preprocess --schema avazu` against
pyarrow's CSV reader alone on the same file (the parsing floor), in one run.

Run:  .venv/bin/python scripts/bench_declared.py [--rows 4000000] [--workers 0] [--keep DIR]

It writes one Avazu-layout CSV (header, 24 columns: hex-string ids, numeric-looking
categorical columns; about 160 bytes a row), then times, each in its own subprocess:
- the floor: `pyarrow.csv.read_csv` of the whole file with its default type inference and
  threads (every core), nothing else;
- `dlrm preprocess --schema avazu --encoding hash --chunk-mb 16` (one pass: parse, check, hash, ids,
  Parquet shards, manifest);
- `dlrm preprocess --schema avazu` (vocab: a counting pass, then the encoding pass).
Each is timed as wall seconds from process start to exit (imports and worker start-up
included) and reported as rows/s, with the ratio of each preprocess run to the floor.
The default of 4M rows (596 MiB) makes the start-up (about 0.8 s: the interpreter, imports
and spawning the workers, against the floor's 0.15 s) a small part of the run, as it is on
a real log (Avazu's is 40M rows); at 1M rows it is a third of ours.
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
HEADER = ("id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,"
          "app_category,device_id,device_ip,device_model,device_type,device_conn_type,C14,"
          "C15,C16,C17,C18,C19,C20,C21")


def write_avazu(path: Path, rows: int, seed: int = 0) -> None:
    """Avazu-shaped rows: long-tailed hex ids (Zipf), small integer codes, and the hour
    (YYMMDDHH) rising through 10 days as the real log's does."""
    rng = np.random.default_rng(seed)
    block = 100_000
    with open(path, "w") as f:
        f.write(HEADER + "\n")
        for start in range(0, rows, block):
            n = min(block, rows - start)

            def hexes(vocab: int, n: int = n) -> np.ndarray:
                ids = np.minimum(rng.zipf(1.3, n), vocab).astype(np.uint64)
                return np.char.mod("%08x", (ids * np.uint64(2654435761)) & np.uint64(2**32 - 1))

            cols = [np.char.mod("%d", np.arange(start, start + n) * 7919 + 10**18),
                    np.char.mod("%d", rng.random(n) < 0.17),
                    np.char.mod("%d", _hours(np.arange(start, start + n) * 240 // rows)),
                    np.char.mod("%d", 1005 + rng.integers(0, 3, n)),
                    np.char.mod("%d", rng.integers(0, 2, n))]
            cols += [hexes(v) for v in (4000, 7000, 25, 8000, 500, 30, 2_000_000, 6_000_000,
                                        8000)]
            cols += [np.char.mod("%d", rng.integers(0, k, n)) for k in (5, 4)]
            cols += [np.char.mod("%d", 15000 + rng.integers(0, 2500, n)),
                     np.char.mod("%d", rng.choice([320, 300, 216, 728], n)),
                     np.char.mod("%d", rng.choice([50, 250, 36, 480], n)),
                     np.char.mod("%d", rng.integers(100, 2800, n)),
                     np.char.mod("%d", rng.integers(0, 4, n)),
                     np.char.mod("%d", rng.integers(30, 1900, n)),
                     np.char.mod("%d", np.where(rng.random(n) < 0.5, -1,
                                                100000 + rng.integers(0, 200, n))),
                     np.char.mod("%d", rng.integers(1, 255, n))]
            lines = cols[0]
            for c in cols[1:]:
                lines = np.char.add(np.char.add(lines, ","), c)
            f.write("\n".join(lines.tolist()) + "\n")


def _hours(h: np.ndarray) -> np.ndarray:
    """Hour ``h`` from 2014-10-21 00:00 as Avazu's YYMMDDHH."""
    return 14102100 + (h // 24) * 100 + h % 24


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4_000_000)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--chunk-mb", type=float, default=16,
                    help="chunks small enough that every worker has some of the one file")
    ap.add_argument("--keep", default=None, help="work directory to keep (default: a temp one)")
    args = ap.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench_declared_"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "avazu.csv"
    if not data.exists():
        write_avazu(data, args.rows)
    mib = data.stat().st_size / 2**20
    print(f"input: {data} ({args.rows} rows, {mib:.0f} MiB)")

    floor = timed([sys.executable, "-c", "import sys, pyarrow.csv as c; "
                   "t = c.read_csv(sys.argv[1]); print(t.num_rows)", str(data)])
    results = {"pyarrow.csv.read_csv (floor)": floor}
    for encoding in ("hash", "vocab"):
        out = work / f"out_{encoding}"
        shutil.rmtree(out, ignore_errors=True)
        extra = ["--encoding", "hash", "--buckets", "1000000"] if encoding == "hash" else []
        results[f"dlrm preprocess --schema avazu ({encoding})"] = timed(
            [sys.executable, "-m", "dlrm", "preprocess", "--schema", "avazu", "--input",
             str(data), "--out", str(out), "--workers", str(args.workers),
             "--chunk-mb", str(args.chunk_mb), *extra])
        manifest = json.loads((out / "manifest.json").read_text())
        if manifest["rows_accepted"] != args.rows:  # a fast run that dropped rows is no result
            sys.exit(f"{encoding}: {manifest['rows_accepted']} of {args.rows} rows accepted: "
                     f"{manifest['rejected_by_reason']}")
    for name, seconds in results.items():
        print(f"{name:45s} {seconds:7.2f} s  {args.rows / seconds:12,.0f} rows/s  "
              f"ratio to floor {floor / seconds:.2f}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Benchmark `dlrm preprocess` against torchrec's Criteo preprocessing script.

Run:  .venv/bin/python scripts/bench_preprocess.py [--days 24] [--rows-per-day 100000]
          [--workers W] [--torchrec-rows N] [--keep DIR]

In one run it
1. writes plain Criteo TSV day files with `dlrm synth` (day_0 .. day_{N-1});
2. runs, each as a separate subprocess, on the same files:
   - `dlrm preprocess --encoding hash`  (one pass; comparable to torchrec's script),
   - `dlrm preprocess --encoding vocab` (counting pass + encoding pass),
   - `python -m torchrec.datasets.scripts.npy_preproc_criteo --input_dir D --output_dir O`.
     Its `criteo_1tb` mode looks for day_0 .. day_23 in D and silently skips the ones
     that do not exist, so pointing it at a directory of our day files works as is; it
     processes them one after another in one process (calling
     `BinaryCriteoUtils.tsv_to_npys` per file, which holds a whole file as Python lists);
   - with all 24 days, torchrec's second step too,
     `python -m torchrec.datasets.scripts.contiguous_preproc_criteo` (raw ids → contiguous
     ids, all days held in memory at once): the pair is what our `vocab` encoding does,
     so `vocab` is compared with the two together, `hash` with the first alone;
3. reports for each: wall seconds (process start to exit, interpreter and import time
   included), rows/s (rows = lines in the input files), and the peak RSS of the process
   tree, found by polling /proc every 50 ms and summing VmRSS over the process and all its
   descendants (so our worker processes count; a peak shorter than 50 ms can be missed),
   and cpu_s, the user+system CPU seconds of the tree (getrusage of reaped children): on
   a shared machine it moves less than wall time;
4. prints the rows/s ratio of ours (hash, vocab) to torchrec.

The default input (24 days of 100k rows, 2.4M rows, about 560 MiB) is large enough that
neither tool's start-up (imports, spawning workers: about a second for ours, four for
torchrec's) decides the figures; with small inputs it does.

`--torchrec-rows N` runs torchrec on the first N rows only (split evenly over the days,
copied into a separate directory) and reports its rows/s from those N rows; the output
says so. Useful when the full input would take torchrec too long.
Outputs are checked (our manifest's rows_accepted, torchrec's .npy row counts); any
failure prints the tool's stderr tail and exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")


def count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            n += block.count(b"\n")
    return n


def tree_rss(root_pid: int) -> int:
    """Bytes of RSS summed over root_pid and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/statm") as f:
                resident = int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # comm may hold spaces or ')'
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = resident * PAGE
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(name: str, cmd: list[str], log_dir: Path) -> tuple[float, int, float]:
    """Run cmd; return (wall s, peak tree RSS bytes, CPU s of the tree). Exits on failure."""
    out_path, err_path = log_dir / f"{name}.stdout", log_dir / f"{name}.stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        cpu0, start = children_cpu(), time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.05)
        wall, cpu = time.perf_counter() - start, children_cpu() - cpu0
    if proc.returncode != 0:
        tail = err_path.read_text(errors="replace").splitlines()[-30:]
        print(f"{name} FAILED (exit {proc.returncode}): {' '.join(cmd)}", file=sys.stderr)
        print("\n".join(tail), file=sys.stderr)
        sys.exit(1)
    return wall, peak, cpu


def check(ok: bool, message: str) -> None:
    if not ok:
        print(f"check failed: {message}", file=sys.stderr)
        sys.exit(1)


def head_copy(src: Path, dst: Path, rows: int) -> int:
    """Copy the first `rows` lines of src to dst; return how many were copied."""
    n = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for line in fin:
            if n == rows:
                break
            fout.write(line)
            n += 1
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--days", type=int, default=24)
    parser.add_argument("--rows-per-day", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0,
                        help="dlrm preprocess --workers (0: all cores)")
    parser.add_argument("--buckets", type=int, default=40_000_000, help="hash buckets")
    parser.add_argument("--torchrec-rows", type=int, default=0,
                        help="run torchrec on the first N rows only (0: all)")
    parser.add_argument("--keep", default=None, help="keep inputs and outputs in this dir")
    args = parser.parse_args()
    if not 1 <= args.days <= 24:
        parser.error("--days must be 1..24 (torchrec's script reads day_0 .. day_23 only)")

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_preproc_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    dlrm = [sys.executable, "-m", "dlrm"]
    logs = work / "logs"
    for sub in ("logs", "raw", "hash", "vocab", "torchrec", "torchrec_in", "torchrec_contig"):
        shutil.rmtree(work / sub, ignore_errors=True)
    logs.mkdir()
    raw = work / "raw"
    measure("synth", [*dlrm, "synth", "--out", str(raw), "--days", str(args.days),
                      "--rows-per-day", str(args.rows_per_day), "--seed", str(args.seed)],
            logs)
    days = [raw / f"day_{d}" for d in range(args.days)]
    rows = sum(count_lines(p) for p in days)
    size_mb = sum(p.stat().st_size for p in days) / 2**20
    load = os.getloadavg()
    print(f"input: {len(days)} files, {rows} rows, {size_mb:.1f} MiB; cpus {os.cpu_count()}; "
          f"loadavg before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")

    results: dict[str, tuple[float, int, float, int]] = {}  # name -> (wall, rss, cpu, rows)
    for enc in ("hash", "vocab"):
        out = work / enc
        cmd = [*dlrm, "preprocess", "--input", *map(str, days), "--out", str(out),
               "--workers", str(args.workers), "--encoding", enc]
        if enc == "hash":
            cmd += ["--buckets", str(args.buckets)]
        wall, peak, cpu = measure(f"ours_{enc}", cmd, logs)
        manifest = json.loads((out / "manifest.json").read_text())
        check(manifest["rows_accepted"] == rows,
              f"ours({enc}) accepted {manifest['rows_accepted']} of {rows} rows "
              f"(rejected: {manifest.get('rejected_by_reason')})")
        results[f"ours({enc})"] = (wall, peak, cpu, rows)

    tr_in, tr_rows = raw, rows
    if 0 < args.torchrec_rows < rows:
        tr_in = work / "torchrec_in"
        tr_in.mkdir()
        per_day = -(-args.torchrec_rows // len(days))
        tr_rows = sum(head_copy(p, tr_in / p.name, per_day) for p in days)
    tr_out = work / "torchrec"
    tr_out.mkdir()
    wall, peak, cpu = measure("torchrec", [sys.executable, "-m",
                                      "torchrec.datasets.scripts.npy_preproc_criteo",
                                      "--input_dir", str(tr_in), "--output_dir", str(tr_out)],
                         logs)
    got = sum(np.load(tr_out / f"{p.name}_labels.npy", mmap_mode="r").shape[0] for p in days)
    check(got == tr_rows, f"torchrec wrote {got} rows, expected {tr_rows}")
    results["torchrec"] = (wall, peak, cpu, tr_rows)
    if args.days == 24:
        contig = work / "torchrec_contig"
        contig.mkdir()
        c_wall, c_peak, c_cpu = measure(
            "torchrec_contig", [sys.executable, "-m",
                                "torchrec.datasets.scripts.contiguous_preproc_criteo",
                                "--input_dir", str(tr_out), "--output_dir", str(contig)], logs)
        got = sum(np.load(contig / f"{p.name}_sparse_contig_freq.npy", mmap_mode="r").shape[0]
                  for p in days)
        check(got == tr_rows, f"torchrec contiguous wrote {got} rows, expected {tr_rows}")
        results["torchrec(npy+contiguous)"] = (wall + c_wall, max(peak, c_peak), cpu + c_cpu,
                                               tr_rows)

    for name, (wall, peak, cpu, n) in results.items():
        note = f" (subset: {n} of {rows} rows)" if n != rows else ""
        print(f"{name}: wall_s {wall:.2f} rows {n} rows_per_s {n / wall:.0f} "
              f"peak_rss_mib {peak / 2**20:.0f} cpu_s {cpu:.2f}{note}")
    pairs = [("hash", "torchrec"), ("vocab", "torchrec"), ("vocab", "torchrec(npy+contiguous)")]
    for enc, theirs in pairs:
        if theirs not in results:
            continue
        wall, _, _, n = results[f"ours({enc})"]
        tr_wall, _, _, tr_n = results[theirs]
        print(f"ours({enc}) / {theirs} rows/s ratio: {(n / wall) / (tr_n / tr_wall):.2f}")
    load = os.getloadavg()
    print(f"loadavg after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if args.keep:
        print(f"kept in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

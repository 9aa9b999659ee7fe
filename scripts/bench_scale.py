"""How dlrm's costs grow toward Criteo 1TB: preprocessing at 1x, 4x and 16x a base size,
per stage, then a projection to 4.37B rows and 880M distinct values.

    .venv/bin/python scripts/bench_scale.py [--base-rows 250000] [--scales 1 4 16]
        [--encodings vocab hash] [--train-scales 1 4] [--work DIR]

The data: `dlrm synth --criteo-growth` (Criteo's layout; distinct values grow with the
rows as Criteo's do, the largest features fastest), 4 day files per size.

For each size and encoding, `dlrm preprocess` runs as a subprocess while /proc is polled
every 0.2 s. Stages are told apart by the lines preprocessing prints as it enters each
(`counting`, `merging`, `writing`, `assembling`), timed as they arrive. Per stage:
  - wall seconds;
  - peak RSS of the process tree (the driver and its workers, summed), and peak PSS (the
    same with shared pages, such as the memory-mapped lookup tables every worker reads,
    counted once);
  - peak disk under the output directory (staged rows, counts, shards, tables);
  - I/O: bytes read and written by the tree's read and write calls;
  - rows/s (input rows over the stage's wall time).
At the base size and 4x the loader (one pass over rank 0's training batches) and one
training epoch (`configs/tiny.toml`, 2 ranks) join the table.

The projection fits each figure by least squares over the sizes, with the model it prints
(MODELS): wall time and disk linear in rows; memory by what sets it: the chunk size (the
workers' counts and blocks), the distinct values (lookup tables, shared by the workers),
or the merge's budget (`--memory-gib`, a quarter of the host's memory by default). It
prints what each figure comes to at Criteo 1TB on this host and on a host with `--cores`
cores, `--host-gib` memory and a `--disk-gbps` disk, where the stages spread over the
workers are assumed to scale with the cores (this host has 2) down to their I/O's time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from bench_loader import bench_loader
from bench_preprocess import count_lines, tree_rss

REPO = Path(__file__).resolve().parent.parent
TERABYTE_ROWS, TERABYTE_DISTINCT = 4_373_472_329, 880_000_000
TERABYTE_TEXT = 1.1e12
STAGES = {"counting": "count", "merging": "merge", "writing": "write", "assembling": "finish"}
GIB = 2**30


def _proc_sum(pid: int, name: str, keys: tuple[str, ...]) -> int:
    """The sum of the numbers on the lines of ``/proc/PID/NAME`` that start with ``keys``."""
    with open(f"/proc/{pid}/{name}") as f:
        return sum(int(x.split()[1]) for x in f if x.startswith(keys))


def tree_pss_io(root: int) -> tuple[int, int]:
    """Over ``root`` and its descendants: bytes of PSS (smaps_rollup), and bytes read and
    written so far (rchar + wchar: every read and write call, served by the page cache or
    not; mapped files aside)."""
    pss = io = 0
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            pss += _proc_sum(pid, "smaps_rollup", ("Pss:",)) * 1024
            io += _proc_sum(pid, "io", ("rchar", "wchar"))
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return pss, io


def disk_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def preprocess(inputs: list[Path], out: Path, encoding: str, workers: int) -> dict:
    """Runs `dlrm preprocess`; its stages with wall, peak RSS / PSS / disk."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "dlrm", "preprocess", "--input", *map(str, inputs),
           "--out", str(out), "--encoding", encoding, "--workers", str(workers)]
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    marks, lines = [], []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            for word, stage in STAGES.items():
                if line.startswith(f"preprocess: {word}"):
                    marks.append((time.time(), stage))

    reader = threading.Thread(target=read)
    reader.start()
    samples = []
    while proc.poll() is None:
        pss, io = tree_pss_io(proc.pid)
        samples.append((time.time(), tree_rss(proc.pid), pss, disk_bytes(out), io))
        time.sleep(0.2)
    reader.join()
    end = time.time()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{''.join(lines[-30:])}")
    marks = [(start, "start-up"), *marks, (end, None)]
    stages = {}
    for (t0, name), (t1, _) in zip(marks, marks[1:], strict=False):
        inside = [s for s in samples if t0 <= s[0] < t1]
        before = [s[4] for s in samples if s[0] < t0] or [0]
        stages[name] = {"wall": t1 - t0, **_peaks(inside),
                        "io": max(inside[-1][4] - before[-1], 0) if inside else None}
    stages["all"] = {"wall": end - start, **_peaks(samples), "io": samples[-1][4]}
    return stages


def _peaks(samples: list[tuple]) -> dict[str, int | None]:
    """Peak RSS, PSS and disk of ``samples``; None where a stage was shorter than the
    polling interval and has none."""
    return {k: max(s[i] for s in samples) if samples else None
            for i, k in ((1, "rss"), (2, "pss"), (3, "disk"))}


def fit(x: list[float], y: list[float], at: float) -> tuple[float, float, float]:
    """Least squares ``y = a + b x`` over the sizes: (a, b, the fit at ``at``)."""
    b, a = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    return a, b, a + b * at


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-rows", type=int, default=250_000)
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--encodings", nargs="+", default=["vocab", "hash"])
    ap.add_argument("--train-scales", type=int, nargs="*", default=[1, 4])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cores", type=int, default=64, help="the projected host's cores")
    ap.add_argument("--host-gib", type=float, default=512, help="the projected host's memory")
    ap.add_argument("--disk-gbps", type=float, default=3.0,
                    help="the projected host's disk, GB/s (NVMe: about 3)")
    ap.add_argument("--work", default=None, help="directory for data and outputs (temporary)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_scale."))
    py = sys.executable
    results: dict[str, list[dict]] = {e: [] for e in args.encodings}
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    print(f"host: {os.cpu_count()} cores, {memory:.0f} GiB; {args.workers} workers; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"{'rows':>10} {'distinct':>10} {'enc':>5} {'stage':>8} {'wall s':>8} {'rows/s':>9} "
          f"{'RSS MiB':>8} {'PSS MiB':>8} {'disk MiB':>9} {'I/O MiB':>8}")
    for scale in args.scales:
        rows = args.base_rows * scale
        raw = work / f"raw_{scale}"
        subprocess.run([py, "-m", "dlrm", "synth", "--out", str(raw), "--days", "4",
                        "--rows-per-day", str(rows // 4), "--seed", "0", "--criteo-growth"],
                       cwd=REPO, check=True, capture_output=True)
        inputs = [raw / f"day_{d}" for d in range(4)]
        lines = sum(count_lines(p) for p in inputs)
        text = sum(p.stat().st_size for p in inputs)
        distinct = None
        for enc in args.encodings:
            out = work / f"{enc}_{scale}"
            shutil.rmtree(out, ignore_errors=True)
            stages = preprocess(inputs, out, enc, args.workers)
            manifest = json.loads((out / "manifest.json").read_text())
            if enc == "vocab":
                distinct = sum(c - 2 for c in manifest["cardinalities"])
            row = {"rows": lines, "text": text, "distinct": distinct, "stages": stages}
            for name, s in stages.items():
                mib = {k: "-" if s[k] is None else f"{s[k] / 2**20:.0f}"
                       for k in ("rss", "pss", "disk", "io")}
                print(f"{lines:>10,} {distinct or 0:>10,} {enc:>5} {name:>8} {s['wall']:>8.1f} "
                      f"{lines / s['wall']:>9,.0f} {mib['rss']:>8} {mib['pss']:>8} "
                      f"{mib['disk']:>9} {mib['io']:>8}", flush=True)
            if enc == "vocab" and scale in args.train_scales:
                row["train"] = train(out, work / f"run_{scale}")
                t = row["train"]
                print(f"{lines:>10,} {'':>10} {enc:>5} {'loader':>8} {t['loader_s']:>8.1f} "
                      f"{t['train_rows'] / t['loader_s']:>9,.0f}  (rank 0 of 2's batches, "
                      "one pass)")
                print(f"{lines:>10,} {'':>10} {enc:>5} {'epoch':>8} {t['epoch_s']:>8.1f} "
                      f"{t['train_rows'] / t['epoch_s']:>9,.0f} "
                      f"{max(t['peak_rss_gib']) * 1024:>8.0f}"
                      f"  (2 ranks, tiny.toml; RSS: the larger rank's peak)", flush=True)
            results[enc].append(row)
            if enc != "vocab" or scale not in args.train_scales:
                shutil.rmtree(out)
        shutil.rmtree(raw)
    project(results, args)
    (work / "bench_scale.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({"event": "bench_scale", "work": str(work)}))


def train(data: Path, run: Path) -> dict:
    """One pass of the loader over rank 0's training batches, then one training epoch
    (tiny.toml, 2 ranks): seconds, and each rank's peak RSS (the run's done event)."""
    from dlrm.config import load_config
    from dlrm.data.loader import ParquetBatches
    from dlrm.data.split_checks import split_specs
    from dlrm.schema.manifest import load_manifest
    from dlrm.schema.splits import resolve_split

    config = load_config(REPO / "configs" / "tiny.toml", [f"--data.path={data}"])
    manifest = load_manifest(data)
    segments = resolve_split(data, manifest, split_specs(config.data, manifest)["train"])
    batches = ParquetBatches(segments, config.data.batch_size, 0, 2,
                             features=manifest.features)
    loader_s = bench_loader(batches, 1)
    start = time.time()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "dlrm", "train", "--config", str(REPO / "configs" / "tiny.toml"),
         f"--data.path={data}", "--run-dir", str(run), "--train.resume=none",
         "--eval.limit_batches=1"], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"training failed:\n{proc.stderr[-3000:]}")
    epoch_s = time.time() - start
    done = [json.loads(x) for x in proc.stdout.splitlines() if '"event": "done"' in x][-1]
    shutil.rmtree(run, ignore_errors=True)
    return {"loader_s": loader_s, "epoch_s": epoch_s, "train_rows": batches.rows_total,
            "steps": done["steps"], "peak_rss_gib": done["peak_rss_gib"]}


# Per stage: (whether its work is spread over the workers, its memory model). Memory:
# "chunks": set by the chunk size (each worker holds a chunk's blocks and, counting, its
# distinct values), so constant once the inputs are cut into full chunks (the largest
# size's figure, per worker); "tables": each worker's chunk-set share plus the lookup
# tables, memory-mapped and shared (linear in distinct values); "budget": linear in
# distinct values up to the merge's budget; "driver": one process, constant.
MODELS = {"vocab": {"start-up": (False, "driver"), "count": (True, "chunks"),
                    "merge": (True, "budget"), "write": (True, "tables"),
                    "finish": (False, "driver")},
          "hash": {"start-up": (False, "driver"), "write": (True, "chunks"),
                   "finish": (False, "driver")}}


def project(results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    """Each stage's figures fitted over the sizes, at Criteo 1TB, here and on the host
    ``--cores`` / ``--host-gib`` names."""
    budget = args.host_gib / 4 * GIB
    here = args.workers
    print(f"\nprojection to Criteo 1TB: {TERABYTE_ROWS:,} rows, {TERABYTE_DISTINCT:,} distinct "
          f"values, ~{TERABYTE_TEXT / 1e12:.1f} TB of text; there: {args.cores} cores, "
          f"{args.host_gib:.0f} GiB, {args.cores} workers")
    print("  wall: a + b x rows, divided by the workers where the stage is spread over them "
          f"(there: x {args.cores / here:.0f} workers, assuming the stage scales with cores), "
          f"but no less than its I/O (a + b x rows) at {args.disk_gbps:g} GB/s; "
          "disk: a + b x rows")
    print("  memory (PSS): chunks = the largest size's per worker, x workers; tables = that "
          "+ b x distinct values; budget = a + b x distinct, at most a quarter of the host's "
          "memory; driver = the largest size's")
    print(f"{'enc':>5} {'stage':>8} {'model':>7} {'wall h here':>12} {'wall h there':>13} "
          f"{'PSS GiB there':>14} {'disk GB':>8} {'I/O TB':>7}")
    for enc, rows in results.items():
        if len(rows) < 2 or enc not in MODELS:
            continue
        n = [r["rows"] for r in rows]
        d = [r["distinct"] for r in rows]
        total_wall = total_there = peak_pss = peak_disk = 0.0
        for stage, (spread, memory) in MODELS[enc].items():
            if not all(stage in r["stages"] for r in rows):
                continue
            fig = {k: [r["stages"][stage][k] or 0 for r in rows]
                   for k in ("wall", "pss", "disk", "io")}
            wall = fit(n, fig["wall"], TERABYTE_ROWS)[2] if stage != "start-up" \
                else fig["wall"][-1]
            io = max(fit(n, fig["io"], TERABYTE_ROWS)[2], 0.0)
            there = max(wall * here / args.cores if spread else wall, io / args.disk_gbps / 1e9)
            disk = max(fit(n, fig["disk"], TERABYTE_ROWS)[2], 0.0)
            last = fig["pss"][-1]
            if memory == "chunks":
                pss = last * args.cores / here
            elif memory == "tables":
                _, slope, _ = fit(d, fig["pss"], TERABYTE_DISTINCT)
                pss = (last - slope * d[-1]) * args.cores / here + slope * TERABYTE_DISTINCT
            elif memory == "budget":
                pss = min(fit(d, fig["pss"], TERABYTE_DISTINCT)[2], budget)
            else:
                pss = last
            total_wall, total_there = total_wall + wall, total_there + there
            peak_pss, peak_disk = max(peak_pss, pss), max(peak_disk, disk)
            print(f"{enc:>5} {stage:>8} {memory:>7} {wall / 3600:>12.2f} {there / 3600:>13.2f} "
                  f"{pss / GIB:>14.1f} {disk / 1e9:>8.0f} {io / 1e12:>7.2f}")
        print(f"{enc:>5} {'all':>8} {'':>7} {total_wall / 3600:>12.2f} {total_there / 3600:>13.2f} "
              f"{peak_pss / GIB:>14.1f} {peak_disk / 1e9:>8.0f}")


if __name__ == "__main__":
    main()

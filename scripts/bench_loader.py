"""Loader throughput against the training step rate, on the tiny recipe.

Measures how fast ``ParquetBatches`` alone makes ``Batch``es for one training rank (rank 0
of 2, the recipe's batch size), with and without the background prefetch thread, plus
shuffle and MLPerf multi-hot variants; then runs the recipe's real training
(``torchrun --nproc_per_node 2``) and reads its step rate from ``metrics.jsonl``. The ratio
says how much headroom the loader has: above 1 it can keep a training rank fed.

    .venv/bin/python scripts/bench_loader.py                 # synth 4 days x 100k rows first
    .venv/bin/python scripts/bench_loader.py --data DATASET  # an existing dataset

Runs in about a minute on a 2-core CPU box (two training runs: data.prefetch 4 and 0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORLD = 2
# MLPerf DLRMv2's bag sizes (torchrec_dlrm's materialize_synthetic_multihot_dataset.py).
MLPERF_SIZES = [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1]


def run(cmd: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-5000:]}")


def make_dataset(root: Path, days: int, rows_per_day: int) -> Path:
    run([sys.executable, "-m", "dlrm", "synth", "--out", str(root / "raw"), "--days", str(days),
         "--rows-per-day", str(rows_per_day), "--seed", "0"])
    run([sys.executable, "-m", "dlrm", "preprocess", "--out", str(root / "data"), "--input",
         *[str(root / "raw" / f"day_{d}") for d in range(days)]])
    return root / "data"


def bench_loader(batches, repeats: int) -> float:
    """Median seconds of a full pass over ``batches``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = sum(1 for _ in batches)
        times.append(time.perf_counter() - start)
        assert n == len(batches)
    return statistics.median(times)


def bench_training(config: Path, data: Path, run_dir: Path, *overrides: str) -> float:
    """Global samples/s of the recipe's training, its first (warm-up) window left out."""
    run([sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={WORLD}", "-m", "dlrm", "train", "--config", str(config),
         f"--data.path={data}", "--run-dir", str(run_dir), "--train.log_every=50",
         "--eval.limit_batches=1", *overrides])
    rates = [m["train/samples_per_sec"] for m in map(json.loads, open(run_dir / "metrics.jsonl"))
             if "train/samples_per_sec" in m]
    return statistics.mean(rates[1:] or rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="dataset (default: synthesise one in a temp dir)")
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.toml"))
    parser.add_argument("--days", type=int, default=4)
    parser.add_argument("--rows-per-day", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5, help="loader passes (median)")
    args = parser.parse_args()

    from dlrm.config import load_config
    from dlrm.data.loader import ParquetBatches
    from dlrm.data.split_checks import split_specs
    from dlrm.schema.manifest import load_manifest
    from dlrm.schema.splits import resolve_split

    with tempfile.TemporaryDirectory(prefix="bench_loader-") as tmp:
        data = Path(args.data) if args.data else make_dataset(Path(tmp), args.days,
                                                              args.rows_per_day)
        config = load_config(args.config, [f"--data.path={data}"])
        manifest = load_manifest(data)
        segments = resolve_split(data, manifest, split_specs(config.data, manifest)["train"])
        bs, cards = config.data.batch_size, manifest.cardinalities

        def loader(**kw) -> ParquetBatches:
            return ParquetBatches(segments, bs, 0, WORLD, features=manifest.features, **kw)

        first = loader()
        print(f"dataset: {data}: {first.rows_total} training rows; rank 0 of {WORLD} reads "
              f"{first.rows} rows, {len(first)} batches of {bs}")
        depth = config.data.prefetch or 4
        threaded, inline = f"prefetch={depth}", "prefetch=0, no thread"
        variants = [
            (threaded, loader(prefetch=depth)),
            (inline, loader(prefetch=0)),
            (f"prefetch={depth}, shuffle_buffer=100000", loader(prefetch=depth,
                                                                shuffle_buffer=100_000)),
            (f"prefetch={depth}, MLPerf multi-hot sizes",
             loader(prefetch=depth, multi_hot_sizes=MLPERF_SIZES, cardinalities=cards)),
        ]
        rates = {}
        for name, batches in variants:
            seconds = bench_loader(batches, args.repeats)
            rates[name] = len(batches) / seconds
            print(f"loader: {rates[name]:.0f} batches/s, {rates[name] * bs:.0f} rows/s "
                  f"({name})", flush=True)

        steps = {}
        for prefetch in (depth, 0):
            samples_per_sec = bench_training(Path(args.config), data, Path(tmp) / f"run{prefetch}",
                                             f"--data.prefetch={prefetch}")
            steps[prefetch] = samples_per_sec / (WORLD * bs)
            print(f"training: {steps[prefetch]:.1f} steps/s per rank ({samples_per_sec:.0f} "
                  f"samples/s over {WORLD} ranks, batch {bs} per rank, data.prefetch={prefetch})",
                  flush=True)
        for name, prefetch in ((threaded, depth), (inline, 0)):
            print(f"ratio: {rates[name] / steps[prefetch]:.0f} (loader {name} / training "
                  f"with data.prefetch={prefetch})")


if __name__ == "__main__":
    main()

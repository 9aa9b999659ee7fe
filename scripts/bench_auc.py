"""Exact AUC (and the other evaluation metrics) over N predictions: seconds and memory.

    .venv/bin/python scripts/bench_auc.py [--rows 10000000]

Predictions are float32 logits as evaluation gathers them (cast to float64 for the
metrics), labels drawn from them so the AUC is far from 0.5; many scores tie. Prints the
seconds of ``auc`` alone and of every metric plus the curves, and the process's peak
resident memory above what the inputs themselves take.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np

from dlrm.metrics import auc, binary_metrics, reliability, roc_points, sigmoid


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    logits = rng.normal(size=args.rows).astype(np.float32).astype(np.float64)
    labels = (rng.random(args.rows) < sigmoid(2 * logits)).astype(np.float64)
    base = peak_rss_mib()

    start = time.perf_counter()
    value = auc(labels, logits)
    auc_seconds = time.perf_counter() - start
    after_auc = peak_rss_mib()

    start = time.perf_counter()
    metrics = binary_metrics(labels, logits)
    roc_points(labels, logits)
    reliability(labels, sigmoid(logits))
    all_seconds = time.perf_counter() - start

    print(f"rows {args.rows:,}; distinct scores {np.unique(logits).size:,}")
    print(f"auc {value:.6f} in {auc_seconds:.2f} s; peak RSS {after_auc:.0f} MiB "
          f"({after_auc - base:.0f} MiB above the inputs)")
    print(f"all metrics + ROC + calibration in {all_seconds:.2f} s; peak RSS "
          f"{peak_rss_mib():.0f} MiB")
    print(json.dumps({"rows": args.rows, "auc": value, "auc_seconds": round(auc_seconds, 3),
                      "all_seconds": round(all_seconds, 3), "peak_rss_mib": round(peak_rss_mib()),
                      "inputs_rss_mib": round(base), "ne": metrics["ne"]}))


if __name__ == "__main__":
    main()

"""A 10M-row x 128 table beside Criteo's small ones: `dlrm plan`'s memory per rank
against each rank's measured peak RSS, over a few hundred steps of 2-rank CPU training
with exact Adagrad (weights plus a same-sized optimizer state).

    .venv/bin/python scripts/bench_large_table.py [--rows 10000000] [--steps 300]

Prints the plan's per-rank estimate (embedding storage, and the whole process), the
measured peak RSS of each rank (the run's "done" event) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(list(args), cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def event(out: str, name: str) -> dict:
    return [e for e in map(json.loads, (x for x in out.splitlines() if x.startswith("{")))
            if e.get("event") == name][-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000, help="rows of the large table")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--work", default=None, help="directory for the data and run (temporary)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_large_table."))
    py = sys.executable
    data = work / "data"
    if not (data / "manifest.json").exists():
        run(py, "-m", "dlrm", "synth", "--out", str(work / "raw"), "--days", "3",
            "--rows-per-day", "200000", "--seed", "1")
        run(py, "-m", "dlrm", "preprocess", "--input",
            *(str(work / "raw" / f"day_{d}") for d in range(3)), "--out", str(data))
    sizes = json.loads((data / "manifest.json").read_text())["cardinalities"]
    big = max(range(len(sizes)), key=sizes.__getitem__)
    sizes[big] = max(sizes[big], args.rows)
    overrides = [f"--data.path={data}", f"--data.batch_size={args.batch_size}",
                 f"--model.embedding_dim={args.dim}",
                 f"--model.dense_arch_layer_sizes=[64,{args.dim}]",
                 f"--model.num_embeddings_per_feature={json.dumps(sizes)}",
                 "--optim.embedding_optimizer=adagrad"]
    plan = event(run(py, "-m", "dlrm", "plan", "--config", "configs/tiny.toml",
                     "--world-size", "2", "--device", "cpu", *overrides), "plan")
    t0 = time.time()
    out = run(py, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "dlrm", "train",
              "--config", "configs/tiny.toml", "--run-dir", str(work / "run"), *overrides,
              f"--train.limit_train_batches={args.steps}", "--eval.limit_batches=20",
              "--train.log_every=100", "--train.resume=none")
    done = event(out, "done")
    print(f"table C{big + 1}: {sizes[big]:,} rows x {args.dim}, exact Adagrad; other tables "
          f"{sum(sizes) - sizes[big]:,} rows; 2 ranks, batch {args.batch_size} per rank, "
          f"{done['steps']} steps in {time.time() - t0:.0f} s (start-up included)")
    print("rank  plan: embeddings GiB  plan: total GiB  measured peak RSS GiB  "
          "plan / measured")
    for m, peak in zip(plan["memory_per_rank"], done["peak_rss_gib"], strict=True):
        print(f"{m['rank']:>4}  {m['ddr_gib']:>20.3f}  {m['total_gib']:>17.3f}  "
              f"{peak:>21.3f}  {m['total_gib'] / peak:>15.3f}")
    if not args.work:
        shutil.rmtree(work)  # the checkpoint alone is the size of the tables
    print(json.dumps({"event": "bench_large_table", "rows": sizes[big], "dim": args.dim,
                      "plan": plan["memory_per_rank"], "peak_rss_gib": done["peak_rss_gib"]}))


if __name__ == "__main__":
    main()

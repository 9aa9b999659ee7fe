"""Where a training step's time goes, per rank. Run it under torchrun:

    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node 2 \\
        scripts/profile_train.py --data DATASET [--config configs/criteo_1tb.toml] \\
        [--steps 60] [--warmup 15] [--profile-steps 10] [--section.key=value ...]

Every rank builds the real training (``dlrm.train.Trainer``: loader, sharded model, fused
optimizers, ``TrainPipelineSparseDist``) with the bench's settings (batch 512 per rank,
the dataset's table sizes, no checkpoints) unless overridden, runs ``--warmup`` steps,
times ``--steps`` more, and rank 0 prints:

1. wall ms/step (mean, median) and each thread's CPU ms/step: the main thread (model,
   optimizers, Python), gloo's threads (the all-to-alls and the all-reduce), the loader's
   prefetch thread. One core a rank: wall minus the sum is time spent waiting; and how
   busy the whole host was over those steps (/proc/stat: user, system, idle, steal);
2. over ``--profile-steps`` further steps under ``torch.profiler``: the operators by self
   CPU time, and the pipeline's and TorchRec's named phases (``## forward ##``,
   ``[output_dist]...``, the all-to-all waits).

Compare with ``scripts/bench_train.py``'s dense-math ceiling (ms/step on one thread).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from bench_train import TRAINING_OVERRIDES  # the benchmark's training settings

REPO = Path(__file__).resolve().parent.parent
DEFAULTS = ["--data.batch_size=512", *TRAINING_OVERRIDES]


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each of this process's threads, as ``name:tid`` (from /proc)."""
    out, tick = {}, os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # ended meanwhile
        name = stat[stat.index("(") + 1: stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[f"{name}:{tid}"] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def host_cpu() -> list[int]:
    """This host's CPU time so far, in ticks: user, nice, system, idle, iowait, irq, softirq,
    steal (the first line of /proc/stat)."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:9]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="a preprocessed dataset")
    parser.add_argument("--config", default=str(REPO / "configs" / "criteo_1tb.toml"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--profile-steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=25, help="operators to list")
    args, overrides = parser.parse_known_args()

    from dlrm.config import load_config
    from dlrm.train.trainer import Trainer

    config = load_config(args.config, [f"--data.path={args.data}", *DEFAULTS, *overrides])
    run_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"profile_train-{os.getppid()}"
    trainer = Trainer(config, run_dir)
    main_rank = trainer.dist.is_main
    batches = trainer.train_batches.iter_epoch(0)
    needed = args.warmup + args.steps + args.profile_steps
    if len(trainer.train_batches) < needed:
        raise SystemExit(f"the dataset has {len(trainer.train_batches)} batches a rank; "
                         f"{needed} are needed")
    for _ in range(args.warmup):
        trainer.pipeline.progress(batches)

    before, host_before, times = thread_cpu(), host_cpu(), []
    for _ in range(args.steps):
        start = time.perf_counter()
        trainer.pipeline.progress(batches)
        times.append(time.perf_counter() - start)
    after = thread_cpu()
    host = [b - a for a, b in zip(host_before, host_cpu(), strict=True)]
    per_thread = {k: (v - before.get(k, 0.0)) * 1e3 / args.steps for k, v in after.items()}

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.profile_steps):
            trainer.pipeline.progress(batches)
    torch.distributed.destroy_process_group()
    if not main_rank:
        return
    shutil.rmtree(trainer.run_dir, ignore_errors=True)

    wall = statistics.mean(times) * 1e3
    print(f"rank 0: {wall:.1f} ms/step wall (median {statistics.median(times) * 1e3:.1f}) "
          f"over {args.steps} steps; CPU ms/step by thread:")
    busy = {k: v for k, v in sorted(per_thread.items(), key=lambda kv: -kv[1]) if v >= 0.05}
    for name, ms in busy.items():
        print(f"  {ms:7.1f}  {name}")
    print(f"  {wall - sum(busy.values()):7.1f}  waiting (wall minus all threads' CPU)")
    total = sum(host) or 1
    print(f"host, all cores, same steps: user {(host[0] + host[1]) / total:.1%}, system "
          f"{(host[2] + host[5] + host[6]) / total:.1%}, idle {(host[3] + host[4]) / total:.1%}, "
          f"steal {host[7] / total:.1%}")

    n = args.profile_steps
    print(f"\noperators by self CPU, ms/step (over {n} profiled steps; the profiler adds "
          f"its own overhead):")
    ops = sorted((e for e in prof.key_averages() if not e.key.startswith(("##", "["))),
                 key=lambda e: -e.self_cpu_time_total)
    for e in ops[:args.rows]:
        print(f"  {e.self_cpu_time_total / 1e3 / n:7.2f}  x{e.count / n:5.1f}  {e.key[:90]}")
    phases: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        if e.key.startswith(("##", "[")):
            phases[re.sub(r" \d+ ##$", " ##", e.key)] += e.cpu_time_total
    print("\nnamed phases (inclusive CPU), ms/step:")
    for key, us in sorted(phases.items(), key=lambda kv: -kv[1])[:args.rows]:
        print(f"  {us / 1e3 / n:7.2f}  {key[:100]}")


if __name__ == "__main__":
    main()

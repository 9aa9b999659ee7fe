"""Training throughput against the dense-math ceiling of the Criteo 1TB DLRM, on CPU.

In one run it
1. makes a dataset with the project's own tools unless ``--data`` is given:
   ``dlrm synth`` (3 days) then ``dlrm preprocess`` (vocab encoding, small cardinalities);
2. CEILING: times, on one thread (``torch.set_num_threads(1)``), the dense math of the
   recipe's model (``--config``, default configs/criteo_1tb.toml): bottom MLP (DenseArch),
   interaction (InteractionArch for "dot", InteractionDCNArch for "dcn") and top MLP
   (OverArch), forward + backward of BCE-with-logits on random labels, one rank's batch
   (``--batch-size``). The 26 pooled embeddings are a random leaf tensor [B, 26, D] that
   requires grad, so the embedding lookups, the all-to-all, the optimizer steps, the DDP
   all-reduce and the loader are all *outside* the ceiling. Same glibc heap settings as a
   training rank (``dlrm.utils.heap.keep_freed_memory``). Median of ``--iters`` steps after
   ``--warmup``, measured before and again after the training; the faster of the two is
   the ceiling (a slow spell of the host during one of them cannot flatter the ratio).
   The 2-rank ceiling is twice one core's rate;
3. ACHIEVED: the real training, ``torchrun --nproc_per_node 2 -m dlrm train`` (OMP_NUM_THREADS=1,
   same model and per-rank batch), for ``--steps`` steps; its global samples/s is read
   from RUN/metrics.jsonl, the first (warm-up) window left out. Its closing checkpoint and
   evaluation are not in the figure. The tables take the dataset's cardinalities
   (``--model.num_embeddings_per_feature=[]``): the recipe's 40M-row tables do not fit here;
4. prints both, per-rank ms/step of each (the difference is the overhead per step: embeddings,
   optimizers, communication, loader, Python) and the ratio achieved / (2 x ceiling),
   whose target is >= 0.8; the last line is a JSON summary.

    .venv/bin/python scripts/bench_train.py                  # ~2-4 min on a 2-core box
    .venv/bin/python scripts/bench_train.py --data DATASET --steps 40 --log-every 10
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

from bench_loader import make_dataset, run  # same dataset recipe, same subprocess runner

REPO = Path(__file__).resolve().parent.parent
WORLD = 2
TARGET = 0.8
# The training the benchmark measures (and scripts/profile_train.py takes apart): the
# dataset's table sizes (the recipe's 40M-row tables do not fit here), no checkpoints,
# one evaluation batch.
TRAINING_OVERRIDES = ["--model.num_embeddings_per_feature=[]", "--train.checkpoint_every=0",
                      "--eval.limit_batches=1"]


def bench_ceiling(config, cardinalities: list[int], batch: int, warmup: int,
                  iters: int) -> list[float]:
    """Seconds of each timed dense forward + backward on one thread (embeddings excluded)."""
    import torch

    from dlrm.schema.declared import load_schema
    from dlrm.schema.features import NUM_DENSE, NUM_SPARSE
    from dlrm.train.model import build_model
    from dlrm.utils.heap import keep_freed_memory

    keep_freed_memory()  # the heap settings of a training rank (dlrm.train.dist)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dlrm = build_model(config.model, load_schema("criteo").features(), cardinalities,
                       torch.device("cpu"), sparse_device=torch.device("meta")).model
    archs = (dlrm.dense_arch, dlrm.inter_arch, dlrm.over_arch)
    params = [p for arch in archs for p in arch.parameters()]
    dense = torch.rand(batch, NUM_DENSE)
    pooled = torch.randn(batch, NUM_SPARSE, config.model.embedding_dim, requires_grad=True)
    labels = torch.randint(0, 2, (batch,)).float()
    times = []
    for i in range(warmup + iters):
        for t in (*params, pooled):
            t.grad = None
        start = time.perf_counter()
        inter = dlrm.inter_arch(dense_features=dlrm.dense_arch(dense), sparse_features=pooled)
        logits = dlrm.over_arch(inter).squeeze(-1)
        torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).backward()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def concurrent_ceiling(config: str, data: Path, batch: int, warmup: int, iters: int) -> float:
    """Samples/s of WORLD single-thread ceiling measurements running at the same time.

    On a host whose cores share their arithmetic units (SMT siblings, or vCPUs that are
    hyperthreads of one physical core), two ranks cannot reach twice one core's rate:
    this is the dense-math ceiling two ranks can actually share here."""
    cmd = [sys.executable, __file__, "--ceiling-only", "--config", config, "--data", str(data),
           "--batch-size", str(batch), "--warmup", str(warmup), "--iters", str(iters)]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
             for _ in range(WORLD)]
    seconds = [float(p.communicate()[0].split()[-1]) for p in procs]
    return sum(batch / s for s in seconds)


def bench_training(config: Path, data: Path, run_dir: Path, batch: int, steps: int,
                   log_every: int) -> list[float]:
    """Global samples/s of each logged training window (the first one is warm-up)."""
    run([sys.executable, "-m", "torch.distributed.run", "--standalone",
         "--nproc_per_node", str(WORLD), "-m", "dlrm", "train", "--config", str(config),
         f"--data.path={data}", f"--data.batch_size={batch}",
         f"--train.limit_train_batches={steps}", f"--train.log_every={log_every}",
         *TRAINING_OVERRIDES, "--run-dir", str(run_dir)])
    with open(run_dir / "metrics.jsonl") as f:
        return [m["train/samples_per_sec"] for m in map(json.loads, f)
                if "train/samples_per_sec" in m]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "criteo_1tb.toml"))
    parser.add_argument("--data", help="dataset (default: synthesise one under --workdir)")
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--rows-per-day", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=512, help="per rank")
    parser.add_argument("--warmup", type=int, default=5, help="ceiling: untimed steps")
    parser.add_argument("--iters", type=int, default=100, help="ceiling: timed steps (median)")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--log-every", type=int, default=25, help="training steps per window")
    parser.add_argument("--workdir", help="temporary files (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep --workdir afterwards")
    parser.add_argument("--ceiling-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ceiling_only:  # one of concurrent_ceiling's processes: print the median step
        from dlrm.config import load_config
        from dlrm.schema.manifest import load_manifest

        config = load_config(args.config, [f"--data.path={args.data}"])
        times = bench_ceiling(config, load_manifest(args.data).cardinalities,
                              args.batch_size, args.warmup, args.iters)
        print(statistics.median(times))
        return
    if args.steps < 2 * args.log_every or args.steps % args.log_every:
        parser.error("--steps must be a multiple of --log-every, at least 2 windows (the first "
                     "is warm-up)")

    from dlrm.config import load_config
    from dlrm.schema.manifest import load_manifest

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_train-"))
    ours = [work / "run"] + ([] if args.data else [work / "raw", work / "data"])
    for path in ours:  # left by an earlier --keep run: start afresh (no resume)
        shutil.rmtree(path, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        data = Path(args.data) if args.data else make_dataset(work, args.days, args.rows_per_day)
        config = load_config(args.config, [f"--data.path={data}"])
        cards = load_manifest(data).cardinalities
        bs, m = args.batch_size, config.model
        print(f"dataset: {data} ({time.perf_counter() - start:.0f} s); model: {args.config}: "
              f"interaction {m.interaction}, dim {m.embedding_dim}, bottom "
              f"{m.dense_arch_layer_sizes}, top {m.over_arch_layer_sizes}; batch {bs} per rank",
              flush=True)

        before = statistics.median(bench_ceiling(config, cards, bs, args.warmup, args.iters))
        print(f"ceiling, before training: {before * 1e3:.1f} ms/step on 1 core (median of "
              f"{args.iters})", flush=True)
        shared = concurrent_ceiling(args.config, data, bs, args.warmup, args.iters)
        rates = bench_training(Path(args.config), data, work / "run", bs, args.steps,
                               args.log_every)
        after = statistics.median(bench_ceiling(config, cards, bs, args.warmup, args.iters))
        # This host's speed drifts by tens of percent over minutes: the faster of the two
        # ceilings, so a slow spell during one of them cannot flatter the ratio.
        ceiling_s = min(before, after)
        ceiling = bs / ceiling_s
        print(f"ceiling: {ceiling:.0f} samples/s on 1 core ({ceiling_s * 1e3:.1f} ms/step, the "
              f"faster of before training {before * 1e3:.1f} and after {after * 1e3:.1f}); "
              f"x{WORLD} ranks: {WORLD * ceiling:.0f} samples/s")
        print(f"ceiling of {WORLD} single-thread processes at once (what {WORLD} ranks can "
              f"share on this host): {shared:.0f} samples/s = {shared / ceiling:.2f} x one "
              f"core")
        if len(rates) != args.steps // args.log_every:
            print(f"WARNING: {len(rates)} windows, not {args.steps // args.log_every}: the "
                  f"dataset holds fewer than --steps batches per rank (its last window is short)")
        achieved = statistics.mean(rates[1:] or rates)
        step_s = WORLD * bs / achieved  # per-rank step time: every rank steps together
        print(f"achieved: {achieved:.0f} samples/s over {WORLD} ranks ({step_s * 1e3:.1f} "
              f"ms/step; mean of {len(rates[1:] or rates)} windows of {args.log_every} steps "
              f"after the first: {', '.join(f'{r:.0f}' for r in rates)})")
        ratio = achieved / (WORLD * ceiling)
        print(f"per step: achieved {step_s * 1e3:.1f} ms vs dense ceiling {ceiling_s * 1e3:.1f} "
              f"ms: overhead {(step_s - ceiling_s) * 1e3:.1f} ms (embeddings, optimizers, "
              f"communication, loader, Python)")
        print(f"ratio: {ratio:.2f} achieved / ({WORLD} x ceiling); target >= {TARGET}: "
              f"{'met' if ratio >= TARGET else 'NOT met'}")
        print(f"ratio to the concurrent ceiling: {achieved / shared:.2f} achieved / "
              f"{shared:.0f}")
        print(json.dumps({
            "config": args.config, "interaction": m.interaction, "batch_per_rank": bs,
            "world": WORLD, "ceiling_samples_per_sec_1core": round(ceiling, 1),
            "ceiling_samples_per_sec_2ranks": round(WORLD * ceiling, 1),
            "achieved_samples_per_sec": round(achieved, 1),
            "concurrent_ceiling_samples_per_sec": round(shared, 1),
            "ratio_to_concurrent_ceiling": round(achieved / shared, 3),
            "ceiling_ms_per_step": round(ceiling_s * 1e3, 2),
            "ceiling_ms_per_step_before_after": [round(before * 1e3, 2), round(after * 1e3, 2)],
            "achieved_ms_per_step": round(step_s * 1e3, 2), "ratio": round(ratio, 3),
            "target": TARGET, "windows": [round(r, 1) for r in rates]}))
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:  # only what this script wrote; the temp dir itself if it made it
            for path in ours:
                shutil.rmtree(path, ignore_errors=True)
            if not args.workdir:
                work.rmdir()


if __name__ == "__main__":
    main()

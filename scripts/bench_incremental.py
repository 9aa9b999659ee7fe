"""The daily loop of a model that lives: frozen vs incremental vs full retrain, per day.

Run:  .venv/bin/python scripts/bench_incremental.py [--days 6] [--first 2]
          [--rows-per-day 100000] [--drift 0.2] [--work runs/bench_incremental]

A planted log with drift (``dlrm synth --drift``: ids new each day, effects on a random
walk) of ``--days`` days. The first ``--first`` days train a base model (one pass, 1
process, ``configs/tiny.toml``). Then each following day ``t`` is scored by three models,
each trained on days before ``t`` only:

- **frozen**: the base model, day ``t`` encoded ``--like`` its dataset (new ids: OOV);
- **incremental**: yesterday's model; every day ``t`` it is updated by ``dlrm preprocess
  day_t --like G --grow`` (its vocabularies grown by day ``t``'s values) and one pass of
  ``dlrm train --init-from`` yesterday's checkpoint on that day alone (its optimizer state
  too, unless ``--weights-only``);
- **full retrain**: a fresh model trained (one pass) on all days before ``t``, preprocessed
  from scratch (vocabularies counted on those days).

It prints one table row per day: the AUC of each on day ``t`` (all its rows), the wall
time of the incremental update and of the full retrain that produced that day's models
(preprocessing + training, each command's start-up included), and their training loops'
seconds alone; then a JSON line with every figure.
Nothing is kept between runs but the synthetic log (``--work``/raw); figures mean
something as ratios within one run (the VM's speed drifts).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ["--config", "configs/tiny.toml", "--train.log_every=1000", "--data.val_sources=none",
         "--optim.warmup_steps=0", "--optim.decay_steps=0"]


def _dlrm(*args: str) -> tuple[str, float]:
    """(stdout, wall seconds) of a dlrm command; exits with its output if it fails."""
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "dlrm", *args], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"dlrm {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout, time.time() - start


def _event(out: str, name: str) -> dict:
    return [json.loads(x) for x in out.splitlines() if x.startswith(f'{{"event": "{name}"')][-1]


def _last(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step-*[0-9]"))[-1]


def _train(run: Path, data: Path, days: list[str], test: str = "none",
           *extra: str) -> tuple[Path, float, float]:
    """The run's last checkpoint, its wall seconds and its training loop's seconds."""
    out, seconds = _dlrm("train", *MODEL, f"--data.path={data}",
                         f"--data.train_sources={json.dumps(days)}",
                         f"--data.test_sources={test}", "--run-dir", str(run), *extra)
    done = _event(out, "done")
    return _last(run), seconds, done["samples"] / done["samples_per_sec"]


def _preprocess(out: Path, days: list[Path], *extra: str) -> float:
    return _dlrm("preprocess", "--input", *map(str, days), "--out", str(out), *extra)[1]


def _auc(checkpoint: Path, data: Path) -> float:
    return _event(_dlrm("evaluate", "--checkpoint", str(checkpoint), "--data", str(data))[0],
                  "evaluate")["auc"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--days", type=int, default=6)
    p.add_argument("--first", type=int, default=2, help="days the base model trains on")
    p.add_argument("--rows-per-day", type=int, default=100_000)
    p.add_argument("--drift", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/bench_incremental")
    p.add_argument("--weights-only", action="store_true",
                   help="the daily update starts a fresh optimizer (--init-from-weights-only)")
    args = p.parse_args()
    work = Path(args.work).resolve()
    raw = work / "raw"
    _dlrm("synth", "--out", str(raw), "--days", str(args.days), "--rows-per-day",
          str(args.rows_per_day), "--drift", str(args.drift), "--seed", str(args.seed))
    for stale in work.iterdir():  # every run from scratch but the log
        if stale != raw:
            shutil.rmtree(stale)
    day = [raw / f"day_{d}" for d in range(args.days)]
    names = [f"day_{d}" for d in range(args.days)]

    first = names[:args.first]
    base = work / "base"
    seconds = _preprocess(base, day[:args.first], "--vocab-from", *first)
    base_ck, train_s, _ = _train(work / "runs" / "base", base, first)
    print(f"base: days 0-{args.first - 1}, preprocess {seconds:.1f}s, train {train_s:.1f}s",
          flush=True)

    rows = []
    grown, model = base, base_ck  # the incremental model and the dataset of its ids
    inc_s = full_s = inc_loop = full_loop = 0.0  # the cost of the models scoring day t
    print(f"{'day':>5} {'frozen':>8} {'incremental':>12} {'full':>8} "
          f"{'incremental s':>14} {'full s':>8} {'loop s (inc / full)':>20}", flush=True)
    for t in range(args.first, args.days):
        test = work / f"test_{t}"
        _preprocess(test / "frozen", [day[t]], "--like", str(base))
        _preprocess(test / "incremental", [day[t]], "--like", str(grown))
        frozen, incremental = _auc(base_ck, test / "frozen"), _auc(model, test / "incremental")
        if t == args.first:  # all three are the base model
            full = frozen
        else:
            full_data = work / f"full_{t}"
            full_s = _preprocess(full_data, day[:t + 1], "--vocab-from", *names[:t])
            _, seconds, full_loop = _train(work / "runs" / f"full_{t}", full_data, names[:t],
                                           json.dumps([names[t]]))
            full_s += seconds
            full = json.loads((work / "runs" / f"full_{t}" / "eval" / "test.json")
                              .read_text())["metrics"]["auc"]
        rows.append({"day": t, "frozen": frozen, "incremental": incremental, "full": full,
                     "incremental_s": inc_s, "full_s": full_s,
                     "incremental_loop_s": inc_loop, "full_loop_s": full_loop})
        print(f"{t:>5} {frozen:>8.4f} {incremental:>12.4f} {full:>8.4f} {inc_s:>14.1f} "
              f"{full_s:>8.1f} {f'{inc_loop:.1f} / {full_loop:.1f}':>20}", flush=True)
        if t + 1 < args.days:  # tomorrow's incremental model: today's day, one pass
            nxt = work / f"grown_{t}"
            inc_s = _preprocess(nxt, [day[t]], "--like", str(grown), "--grow",
                                "--vocab-from", names[t])
            model, seconds, inc_loop = _train(work / "runs" / f"incremental_{t}", nxt,
                                              [names[t]], "none", "--init-from", str(model),
                                              *(["--init-from-weights-only"]
                                                if args.weights_only else []))
            inc_s += seconds
            grown = nxt
    drifted = rows[1:]
    summary = {
        "event": "bench_incremental", "days": args.days, "first": args.first,
        "rows_per_day": args.rows_per_day, "drift": args.drift,
        "weights_only": args.weights_only, "rows": rows,
        "max_gap_to_full": max((r["full"] - r["incremental"] for r in drifted), default=None),
        "above_frozen_every_day": all(r["incremental"] > r["frozen"] for r in drifted),
        "cost_ratio": (sum(r["incremental_s"] for r in drifted)
                       / max(1e-9, sum(r["full_s"] for r in drifted))),
        "loop_cost_ratio": (sum(r["incremental_loop_s"] for r in drifted)
                            / max(1e-9, sum(r["full_loop_s"] for r in drifted))),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

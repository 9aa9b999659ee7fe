"""From a checkpoint to predictions: each table precision's size, parity and speed, and
`dlrm predict` against another checkout's and against preprocess --like + score.

Run:  .venv/bin/python scripts/bench_predict.py [--days 3] [--rows-per-day 200000]
          [--work runs/bench_predict] [--code OTHER_CHECKOUT]

It writes (once; kept in ``--work``) a synthetic Criteo dataset, trains ``configs/tiny.toml``
on it for one epoch (1 process), then:

1. exports the checkpoint at fp32, fp16, int8 and int4, and prints each export's size on
   disk, the test AUC of ``dlrm predict`` on the raw held-out day's second half (the test
   split) against ``dlrm evaluate`` of the checkpoint, the largest difference of its
   predictions from fp32's, ``dlrm predict``'s rows/s, and one forward pass of 1 and of
   4096 rows (one torch thread, as the server scores);
2. prints rows/s of ``dlrm predict`` (fp32) on the raw held-out day, of this checkout and
   of ``--code``'s (each twice, alternating: the VM's speed drifts), and of ``dlrm
   preprocess --like`` followed by ``dlrm score`` on the same file (wall time of the
   commands, start-up included; one after the other).

The server under load: ``scripts/bench_serve.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent


def _dlrm(*args: str, code: Path | None = None) -> tuple[str, float]:
    """(stdout, wall seconds) of a dlrm command, of this checkout or ``code``'s."""
    start = time.time()
    env = {**os.environ, "PYTHONPATH": str(code)} if code else None
    proc = subprocess.run([sys.executable, "-m", "dlrm", *args], cwd=code or ROOT,
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"dlrm {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout, time.time() - start


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from dlrm.metrics import auc

    return auc(labels, scores)


def setup(work: Path, days: int, rows: int) -> tuple[Path, Path, Path]:
    raw, data, run = work / "raw", work / "data", work / "run"
    if not (raw / "truth.json").exists():
        _dlrm("synth", "--out", str(raw), "--days", str(days), "--rows-per-day", str(rows))
    if not (data / "manifest.json").exists():
        _dlrm("preprocess", "--input", *(str(raw / f"day_{d}") for d in range(days)),
              "--out", str(data))
    checkpoints = sorted((run / "checkpoints").glob("step-*[0-9]"))
    if not checkpoints:
        _dlrm("train", "--config", "configs/tiny.toml", f"--data.path={data}", "--run-dir",
              str(run), "--train.checkpoint_every=0")
        checkpoints = sorted((run / "checkpoints").glob("step-*[0-9]"))
    return raw / f"day_{days - 1}", data, checkpoints[-1]


def forward_ms(model: Path, held_out: Path, rows: int) -> float:
    """Milliseconds of one forward pass of the model's rows-row batch (tables to output,
    the rows already converted; one torch thread, as the server scores), median of 20."""
    import torch

    from dlrm.data.batches import to_batch
    from dlrm.serve.model_dir import load_exported
    from dlrm.serve.served import Served

    torch.set_num_threads(1)
    served = Served.of(load_exported(model))
    lines = [x.rstrip("\n").split("\t") for x, _ in zip(held_out.open(), range(rows),
                                                           strict=False)]
    scorer = served.scorer
    block, _ = served.rows.convert(served.rows.fields(lines))
    batch = to_batch(scorer.rows_of(scorer.encode(block)), scorer.features.sparse)
    times = []
    with torch.no_grad():
        for _ in range(25):
            start = time.perf_counter()
            served.exported.model.model(batch.dense_features, batch.sparse_features)
            times.append(time.perf_counter() - start)
    return float(np.median(times[5:]) * 1000)


def precisions(work: Path, held_out: Path, data: Path, checkpoint: Path) -> None:
    out, _ = _dlrm("evaluate", "--checkpoint", str(checkpoint), "--data", str(data))
    want = json.loads(out.splitlines()[-1])["auc"]
    rows = sum(1 for _ in held_out.open("rb"))
    print(f"\nExports of {checkpoint} (checkpoint test AUC {want:.6f}); dlrm predict of the "
          f"raw held-out day ({rows} rows), wall time with start-up; one forward pass:")
    print("| tables | size on disk | test AUC of dlrm predict | minus the checkpoint's | "
          "max abs diff of p from fp32 | dlrm predict rows/s | forward 1 row ms | "
          "forward 4096 rows ms |")
    print("|---|---|---|---|---|---|---|---|")
    base = None
    for tables in ("fp32", "fp16", "int8", "int4"):
        model = work / f"model-{tables}"
        shutil.rmtree(model, ignore_errors=True)
        _dlrm("export", "--checkpoint", str(checkpoint), "--out", str(model), "--tables", tables)
        size = sum(f.stat().st_size for f in model.rglob("*") if f.is_file())
        preds = work / f"preds-{tables}.parquet"
        _, seconds = _dlrm("predict", "--model", str(model), "--input", str(held_out), "--out",
                           str(preds))
        table = pq.read_table(preds)
        probs = table.column("prob").to_numpy()
        base = probs if base is None else base
        test = table.slice(table.num_rows // 2)  # the held-out day's second half
        got = _auc(test.column("label").to_numpy(), test.column("prob").to_numpy())
        print(f"| {tables} | {size / 2**20:.1f} MiB | {got:.6f} | {got - want:+.2e} | "
              f"{np.abs(probs - base).max():.2e} | {rows / seconds:,.0f} | "
              f"{forward_ms(model, held_out, 1):.3f} | "
              f"{forward_ms(model, held_out, 4096):.2f} |", flush=True)


def speed(work: Path, held_out: Path, data: Path, checkpoint: Path, code: Path | None,
          ) -> None:
    rows = sum(1 for _ in held_out.open("rb"))
    out = work / "speed.parquet"
    model = str(work / "model-fp32")
    runs = [("this checkout", None)] + ([(str(code), code)] if code else [])
    print(f"\nScoring the raw held-out day ({rows} rows, {held_out.stat().st_size / 2**20:.0f} "
          "MiB), wall time of the commands, each twice, alternating:")
    seconds: dict[str, list[float]] = {name: [] for name, _ in runs}
    for _ in range(2):
        for name, checkout in runs:
            seconds[name].append(_dlrm("predict", "--model", model, "--input", str(held_out),
                                       "--out", str(out), code=checkout)[1])
    for name, s in seconds.items():
        print(f"- dlrm predict (fp32) of {name}: {min(s):.2f} s (best of 2), "
              f"{rows / min(s):,.0f} rows/s")
    like = work / "like"
    shutil.rmtree(like, ignore_errors=True)
    _, like_s = _dlrm("preprocess", "--like", str(data), "--input", str(held_out), "--out",
                      str(like))
    _, score_s = _dlrm("score", "--checkpoint", str(checkpoint), "--data", str(like), "--out",
                       str(work / "scored.parquet"))
    print(f"- dlrm preprocess --like + dlrm score: {like_s:.2f} + {score_s:.2f} s, "
          f"{rows / (like_s + score_s):,.0f} rows/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=3)
    ap.add_argument("--rows-per-day", type=int, default=200_000)
    ap.add_argument("--work", default="runs/bench_predict")
    ap.add_argument("--code", type=Path, default=None,
                    help="another checkout whose dlrm predict to time beside this one's")
    args = ap.parse_args()
    work = ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    held_out, data, checkpoint = setup(work, args.days, args.rows_per_day)
    precisions(work, held_out, data, checkpoint)
    speed(work, held_out, data, checkpoint, args.code)


if __name__ == "__main__":
    main()

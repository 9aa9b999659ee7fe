"""From a checkpoint to predictions: export parity, sizes, predict speed, server latency.

Run:  .venv/bin/python scripts/bench_predict.py [--days 3] [--rows-per-day 200000]
          [--work runs/bench_predict] [--requests 400]

It writes (once; kept in ``--work``) a synthetic Criteo dataset, trains ``configs/tiny.toml``
on it for one epoch (1 process), then:

1. exports the checkpoint at fp32, fp16, int8 and int4, and prints each export's size on
   disk and the test AUC of ``dlrm predict`` on the raw held-out day's second half (the
   test split) against ``dlrm evaluate`` of the checkpoint;
2. prints rows/s of ``dlrm predict`` on the raw held-out day against ``dlrm preprocess
   --like`` followed by ``dlrm score`` on the same file (wall time of the commands,
   start-up included; the same machine, one after the other);
3. serves the fp32 export (``dlrm serve``) and prints p50 / p99 latency and requests/s on
   loopback at concurrency 1 and 16, with 1-row and 256-row requests.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # helpers.Server: the server tests' real server


def _dlrm(*args: str) -> tuple[str, float]:
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "dlrm", *args], cwd=ROOT, capture_output=True,
                          text=True)
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


def parity(work: Path, held_out: Path, data: Path, checkpoint: Path) -> None:
    out, _ = _dlrm("evaluate", "--checkpoint", str(checkpoint), "--data", str(data))
    want = json.loads(out.splitlines()[-1])["auc"]
    print(f"\nExports of {checkpoint} (checkpoint test AUC {want:.6f}):")
    print("| tables | size on disk | test AUC of dlrm predict | minus the checkpoint's |")
    print("|---|---|---|---|")
    for tables in ("fp32", "fp16", "int8", "int4"):
        model = work / f"model-{tables}"
        shutil.rmtree(model, ignore_errors=True)
        _dlrm("export", "--checkpoint", str(checkpoint), "--out", str(model), "--tables", tables)
        size = sum(f.stat().st_size for f in model.rglob("*") if f.is_file())
        preds = work / f"preds-{tables}.parquet"
        _dlrm("predict", "--model", str(model), "--input", str(held_out), "--out", str(preds))
        table = pq.read_table(preds)
        test = table.slice(table.num_rows // 2)  # the held-out day's second half
        got = _auc(test.column("label").to_numpy(), test.column("prob").to_numpy())
        print(f"| {tables} | {size / 2**20:.1f} MiB | {got:.6f} | {got - want:+.2e} |",
              flush=True)


def speed(work: Path, held_out: Path, data: Path, checkpoint: Path) -> None:
    rows = sum(1 for _ in held_out.open("rb"))
    out = work / "speed.parquet"
    _, predict_s = _dlrm("predict", "--model", str(work / "model-fp32"), "--input",
                         str(held_out), "--out", str(out))
    like = work / "like"
    shutil.rmtree(like, ignore_errors=True)
    _, like_s = _dlrm("preprocess", "--like", str(data), "--input", str(held_out), "--out",
                      str(like))
    _, score_s = _dlrm("score", "--checkpoint", str(checkpoint), "--data", str(like), "--out",
                       str(work / "scored.parquet"))
    print(f"\nScoring the raw held-out day ({rows} rows, {held_out.stat().st_size / 2**20:.0f} "
          "MiB), wall time of the commands:")
    print(f"- dlrm predict (fp32): {predict_s:.2f} s, {rows / predict_s:,.0f} rows/s")
    print(f"- dlrm preprocess --like + dlrm score: {like_s:.2f} + {score_s:.2f} s, "
          f"{rows / (like_s + score_s):,.0f} rows/s", flush=True)


def latency(work: Path, held_out: Path, requests: int) -> None:
    from helpers import Server

    lines = [x.rstrip("\n").split("\t") for x, _ in zip(held_out.open(), range(256),
                                                           strict=False)]
    server = Server(work / "model-fp32")
    print("\n`dlrm serve` (fp32) on loopback:")
    print("| concurrency | rows per request | p50 ms | p99 ms | requests/s |")
    print("|---|---|---|---|---|")
    try:
        for concurrency in (1, 16):
            for size in (1, 256):
                body = json.dumps({"rows": lines[:size]}).encode()
                times: list[float] = []
                per_thread = max(1, requests // concurrency)

                def ask(body: bytes = body, times: list[float] = times, n: int = per_thread,
                        ) -> None:
                    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
                    for _ in range(n):
                        start = time.perf_counter()
                        conn.request("POST", "/predict", body=body,
                                     headers={"Content-Type": "application/json"})
                        resp = conn.getresponse()
                        resp.read()
                        assert resp.status == 200
                        times.append(time.perf_counter() - start)
                    conn.close()

                threads = [threading.Thread(target=ask) for _ in range(concurrency)]
                start = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - start
                ms = np.array(times) * 1000
                print(f"| {concurrency} | {size} | {np.percentile(ms, 50):.1f} | "
                      f"{np.percentile(ms, 99):.1f} | {len(times) / wall:,.0f} |", flush=True)
    finally:
        server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=3)
    ap.add_argument("--rows-per-day", type=int, default=200_000)
    ap.add_argument("--work", default="runs/bench_predict")
    ap.add_argument("--requests", type=int, default=400, help="per latency cell")
    args = ap.parse_args()
    work = ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    held_out, data, checkpoint = setup(work, args.days, args.rows_per_day)
    parity(work, held_out, data, checkpoint)
    speed(work, held_out, data, checkpoint)
    latency(work, held_out, args.requests)


if __name__ == "__main__":
    main()

"""`dlrm serve` under an independent load generator (wrk), beside its HTTP stack's floor.

Run:  .venv/bin/python scripts/bench_serve.py [--seconds 10] [--work DIR]
          [-- extra dlrm serve flags, e.g. --max-wait-ms 1]

It makes a tiny Criteo model in --work (once: synthetic days, a few training steps, an
fp32 export; the model's size barely matters here, the serving path does) and takes its
requests' raw rows from the held-out day. It starts
`dlrm serve` with the defaults (or the flags after --), waits for GET /ready, then runs
wrk (one thread, loopback; installed from Debian's packages where missing:
`apt-get install wrk`) against, in order, each for --seconds:
- GET /health at 16 connections: the HTTP stack's own floor;
- POST /predict with 1 raw row at 1 and at 16 connections;
- POST /predict with 256 raw rows at 16 connections;
and prints requests/s, rows/s, p50 and p99 latency and non-2xx answers of each, and the
ratio of 1-row requests/s at 16 connections to /health's in the same run. wrk and the
server share the VM's cores, as any loopback measurement does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DLRM = [sys.executable, "-m", "dlrm"]
POST_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = assert(io.open(os.getenv("DLRM_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()
"""


def make_model(work: Path) -> Path:
    """A tiny Criteo model: 2 synthetic days, 20 training steps, fp32 export."""
    run = lambda *a: subprocess.run([*DLRM, *a], cwd=ROOT, check=True,  # noqa: E731
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run("synth", "--out", str(work / "raw"), "--days", "2", "--rows-per-day", "20000")
    run("preprocess", "--input", str(work / "raw" / "day_0"), str(work / "raw" / "day_1"),
        "--out", str(work / "data"))
    run("train", "--config", "configs/tiny.toml", f"--data.path={work / 'data'}",
        "--run-dir", str(work / "run"), "--train.limit_train_batches=20")
    checkpoint = sorted((work / "run" / "checkpoints").glob("step-*[0-9]"))[-1]
    run("export", "--checkpoint", str(checkpoint), "--out", str(work / "model"))
    return work / "model"


def wrk(url: str, connections: int, seconds: int, body: Path | None) -> dict[str, float]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    env = None
    if body is not None:
        script = body.with_suffix(".lua")
        script.write_text(POST_LUA)
        cmd[1:1] = ["-s", str(script)]
        env = {"DLRM_BODY": str(body), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": ms("50"), "p99_ms": ms("99"),
            "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": errors.group(1).strip() if errors else ""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--code", type=Path, default=ROOT,
                    help="the checkout whose server runs (e.g. a worktree of an older commit, "
                         "for a before/after ratio); the model is made by this one")
    ap.add_argument("serve_flags", nargs="*")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_serve_"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model" if (work / "model" / "model.json").exists() else make_model(work)
    rows = [line.rstrip("\n").split("\t")
            for line in (work / "raw" / "day_1").open().readlines()[:256]]
    (work / "one.json").write_text(json.dumps({"rows": rows[:1]}))
    (work / "many.json").write_text(json.dumps({"rows": rows}))

    server = subprocess.Popen([*DLRM, "serve", "--model", str(model), "--port", str(args.port),
                               *args.serve_flags], cwd=args.code, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(args.code)})
    base = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(base + "/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except urllib.error.HTTPError as e:  # a server older than /ready: /health
                if e.code == 404 and urllib.request.urlopen(base + "/health").status == 200:
                    break
                time.sleep(0.2)
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    sys.exit(f"the server did not come up: {server.stderr.read().decode()}")
                time.sleep(0.2)
        cases = [("GET /health", 16, base + "/health", None, 0),
                 ("POST /predict 1 row", 1, base + "/predict", work / "one.json", 1),
                 ("POST /predict 1 row", 16, base + "/predict", work / "one.json", 1),
                 ("POST /predict 256 rows", 16, base + "/predict", work / "many.json", 256)]
        results = []
        print(f"{'case':24s} {'conns':>5s} {'req/s':>9s} {'rows/s':>9s} {'p50 ms':>8s} "
              f"{'p99 ms':>8s} {'non-2xx':>7s}")
        for name, conns, url, body, n in cases:
            got = wrk(url, conns, args.seconds, body)
            results.append((name, conns, got))
            print(f"{name:24s} {conns:5d} {got['rps']:9.0f} {got['rps'] * n:9.0f} "
                  f"{got['p50_ms']:8.2f} {got['p99_ms']:8.2f} {got['non_2xx']:7d}"
                  + (f"  socket errors: {got['socket_errors']}" if got["socket_errors"] else ""),
                  flush=True)
        health, one16 = results[0][2]["rps"], results[2][2]["rps"]
        print(json.dumps({"event": "bench_serve", "flags": args.serve_flags,
                          "predict_1row_c16_over_health": round(one16 / health, 3),
                          **{f"{n} c{c}": g for n, c, g in results}}))
    finally:
        server.terminate()
        server.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())

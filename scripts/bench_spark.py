"""Benchmark `dlrm preprocess --engine spark` against the single-host path, same data, same run.

Run:  .venv/bin/python scripts/bench_spark.py [--days 24] [--rows-per-day 100000]
          [--master local[2]] [--standalone] [--chunk-mb 64] [--keep DIR]

In one run it
1. writes plain Criteo TSV day files with `dlrm synth` (the preprocessing benchmark's 24
   days of 100,000 rows by default);
2. preprocesses them, in this process, one after the other, with the hash encoding (one
   pass) and the vocab encoding (counting, merge, writing): first on this host (`Pool`,
   every core), then with `--engine spark` on `--master`, whose session is started first
   and timed on its own;
3. checks that each Spark dataset is the single-host one, file for file (the manifest but
   `seconds` and `engine`);
4. prints, per encoding and engine: wall seconds, rows/s, and each stage's seconds (from
   the driver's log lines: count, recount, merge, write, finish), and the ratio of Spark's
   rows/s to the single host's, with and without the session's start-up.

`--standalone` starts a Spark standalone cluster on this host first (one master and two
workers, one core and `--worker-memory` each, by `bin/spark-class
org.apache.spark.deploy.master.Master` / `...deploy.worker.Worker` from PySpark's own
jars), runs the Spark side on it with an event log, and prints each executor's share of
the tasks and of the task time of every stage; the cluster is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dlrm.preprocess.driver import preprocess  # noqa: E402
from dlrm.rows.chunks import Options  # noqa: E402
from dlrm.rows.vocab import Encoding  # noqa: E402
from dlrm.synth.criteo import synth  # noqa: E402

STAGES = [  # a stage ends at the first log line starting with the next one's marker
    ("count", "preprocess: counting the values"),
    ("recount", "preprocess: vocabularies from"),
    ("merge", ("preprocess: merging the counts", "preprocess: Spark sums the counts")),
    ("write", "preprocess: writing the shards"),
    ("finish", "preprocess: assembling the rejects"),
]
ENCODINGS = {"hash": Encoding(type="hash", buckets=1 << 20), "vocab": Encoding()}


def run(raw: list[Path], out: Path, encoding: Encoding, chunk_mb: float,
        spark: tuple[str, list[str]] | None) -> dict:
    """One preprocessing run: its wall seconds and each stage's."""
    marks: list[tuple[str, float]] = []

    def log(message: str) -> None:
        marks.append((message, time.perf_counter()))

    t0 = time.perf_counter()
    manifest = preprocess(raw, out, log=log, encoding=encoding, spark=spark,
                          options=Options(chunk_bytes=int(chunk_mb * 2**20)))
    end = time.perf_counter()
    starts = []
    for name, marker in STAGES:
        markers = marker if isinstance(marker, tuple) else (marker,)
        at = next((t for m, t in marks if m.startswith(markers)), None)
        if name == "count" and at is not None:
            at = t0  # the counting pass starts with the run
        if at is not None:
            starts.append((name, at))
    stages = {name: round((starts[i + 1][1] if i + 1 < len(starts) else end) - at, 2)
              for i, (name, at) in enumerate(starts)}
    rows = manifest.rows_accepted + manifest.rows_rejected
    return {"seconds": round(end - t0, 2), "rows": rows, "stages": stages}


def same_dataset(a: Path, b: Path) -> list[str]:
    """Files that differ between two datasets (the manifest but seconds and engine)."""
    files = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    files |= {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    differ = []
    for f in sorted(files):
        x, y = a / f, b / f
        if not (x.exists() and y.exists()):
            differ.append(str(f))
        elif f.name == "manifest.json":
            mx, my = json.loads(x.read_text()), json.loads(y.read_text())
            for m in (mx, my):
                m.pop("seconds"), m.pop("engine", None)
            if mx != my:
                differ.append(str(f))
        elif x.read_bytes() != y.read_bytes():
            differ.append(str(f))
    return differ


class Standalone:
    """A Spark standalone cluster on this host: one master, two workers."""

    def __init__(self, work: Path, worker_memory: str) -> None:
        import pyspark

        self.home = Path(pyspark.__file__).parent
        self.logs, self.procs = work / "cluster-logs", []
        self.logs.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        port = _free_port()
        self.url = f"spark://{host}:{port}"
        self._start("master", "org.apache.spark.deploy.master.Master", "--host", host,
                    "--port", str(port), "--webui-port", str(_free_port()))
        self._wait(lambda: _listening(host, port), "the master")
        for i in range(2):
            self._start(f"worker-{i}", "org.apache.spark.deploy.worker.Worker", self.url,
                        "--cores", "1", "--memory", worker_memory, "--webui-port",
                        str(_free_port()), "--work-dir", str(work / f"worker-{i}"))
        self._wait(lambda: sum("Successfully registered with master" in
                               (self.logs / f"worker-{i}.log").read_text()
                               for i in range(2)) == 2, "two workers")

    def _start(self, name: str, cls: str, *args: str) -> None:
        env = dict(os.environ, SPARK_HOME=str(self.home), PYSPARK_PYTHON=sys.executable)
        with open(self.logs / f"{name}.log", "w") as log:
            self.procs.append(subprocess.Popen(
                [str(self.home / "bin" / "spark-class"), cls, *args], env=env, stdout=log,
                stderr=subprocess.STDOUT))

    def _wait(self, ready, what: str) -> None:
        deadline = time.time() + 120
        while not ready():
            if time.time() > deadline or any(p.poll() is not None for p in self.procs):
                raise SystemExit(f"bench_spark: {what} did not start; see {self.logs}")
            time.sleep(0.5)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            p.wait(timeout=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def executor_shares(event_dir: Path) -> list[str]:
    """Per job dlrm ran (its description: the stage of preprocessing) and in all: each
    executor's tasks and task seconds (the event log's SparkListenerTaskEnd records)."""
    tasks: dict[tuple[str, str], list[float]] = defaultdict(list)
    job_of: dict[int, str] = {}
    for path in sorted(event_dir.rglob("*")):  # Spark 4: a directory of rolled files per app
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            if event["Event"] == "SparkListenerJobStart":
                name = (event.get("Properties") or {}).get("spark.job.description", "other")
                job_of.update({s: name.removeprefix("dlrm preprocess: ")
                               for s in event["Stage IDs"]})
            elif event["Event"] == "SparkListenerTaskEnd":
                info = event["Task Info"]
                seconds = (info["Finish Time"] - info["Launch Time"]) / 1000
                for job in (job_of.get(event["Stage ID"], "other"), "all"):
                    tasks[(job, info["Executor ID"])].append(seconds)
    lines = []
    for job in dict.fromkeys(j for j, _ in tasks):
        share = {e: t for (j, e), t in tasks.items() if j == job}
        total = sum(sum(t) for t in share.values()) or 1
        lines.append(f"  {job}: " + ", ".join(
            f"executor {e}: {len(t)} tasks, {sum(t):.1f} s ({sum(t) / total:.0%})"
            for e, t in sorted(share.items())))
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=24)
    ap.add_argument("--rows-per-day", type=int, default=100_000)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--standalone", action="store_true")
    ap.add_argument("--worker-memory", default="4g")
    ap.add_argument("--chunk-mb", type=float, default=64)
    ap.add_argument("--encodings", nargs="+", default=list(ENCODINGS), choices=ENCODINGS)
    ap.add_argument("--keep", type=Path, help="work directory to keep (default: a temporary one)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_spark-"))
    raw_dir = work / "raw"
    if not (raw_dir / f"day_{args.days - 1}").exists():
        synth(raw_dir, days=args.days, rows_per_day=args.rows_per_day, seed=0)
    raw = [raw_dir / f"day_{d}" for d in range(args.days)]
    size = sum(p.stat().st_size for p in raw)
    print(f"input: {args.days} days x {args.rows_per_day} rows, {size / 2**20:.0f} MiB; "
          f"{os.cpu_count()} cores", flush=True)
    cluster, conf = None, []
    if args.standalone:
        cluster = Standalone(work, args.worker_memory)
        args.master = cluster.url
        events = work / "events"
        shutil.rmtree(events, ignore_errors=True)
        events.mkdir()
        conf = ["spark.eventLog.enabled=true", f"spark.eventLog.dir={events}",
                "spark.eventLog.compress=false"]
    results = {}
    try:
        for name in args.encodings:
            out = work / f"local-{name}"
            shutil.rmtree(out, ignore_errors=True)
            results[("local", name)] = run(raw, out, ENCODINGS[name], args.chunk_mb, None)
            print(f"local {name}: {results[('local', name)]}", flush=True)
        from pyspark.sql import SparkSession

        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        t0 = time.perf_counter()
        builder = SparkSession.builder.master(args.master).config("spark.ui.enabled", "false")
        for item in conf:
            builder = builder.config(*item.split("=", 1))
        session = builder.getOrCreate()
        session.sparkContext.parallelize([0], 1).count()  # executors up
        startup = time.perf_counter() - t0
        print(f"spark session on {args.master}: {startup:.1f} s to start", flush=True)
        for name in args.encodings:
            out = work / f"spark-{name}"
            shutil.rmtree(out, ignore_errors=True)
            results[("spark", name)] = run(raw, out, ENCODINGS[name], args.chunk_mb,
                                           (args.master, conf))
            print(f"spark {name}: {results[('spark', name)]}", flush=True)
            differ = same_dataset(work / f"local-{name}", out)
            print(f"spark {name}: {'the single-host dataset' if not differ else differ}",
                  flush=True)
            if differ:
                return 1
        session.stop()
    finally:
        if cluster is not None:
            cluster.stop()
    print("\n| encoding | engine | seconds | rows/s | stages (s) |\n|---|---|---|---|---|")
    for (engine, name), r in results.items():
        print(f"| {name} | {engine} | {r['seconds']} | {r['rows'] / r['seconds']:,.0f} | "
              + ", ".join(f"{k} {v}" for k, v in r["stages"].items()) + " |")
    for name in args.encodings:
        local, spark = results[("local", name)], results[("spark", name)]
        print(f"{name}: spark / single-host rows/s = {local['seconds'] / spark['seconds']:.2f}"
              f" without the session's start-up, "
              f"{local['seconds'] / (spark['seconds'] + startup):.2f} with it")
    if args.standalone:
        print("\nexecutors' share (event log):")
        print("\n".join(executor_shares(events)))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

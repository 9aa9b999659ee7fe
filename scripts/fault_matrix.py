"""Faults met, in one run: kills at random moments end as the undisturbed run did, bad state
exits 2 naming what is wrong, nothing exits 0 with a wrong result.

    .venv/bin/python scripts/fault_matrix.py [--repeats 5] [--rows-per-day 4000] [--seed 0]

First the undisturbed runs: `dlrm synth` (3 days), `dlrm preprocess`, `dlrm train` on 2 ranks
(torchrun, gloo), `dlrm export` and a `dlrm serve` answering a fixed set of requests. Then,
``--repeats`` times each, SIGKILL at a random moment of

* ``preprocess``: the driver alone on the 1st, 3rd, ... try (its workers must die with
  it), its whole process group on the others; then the same command again: the dataset
  must equal the undisturbed one (manifest, every table, every other file);
* ``train-rank``: one rank's process (torchrun then stops the job), ``train-job``: the
  whole job, ``checkpoint``: the whole job while a checkpoint is being written (its
  ``.partial`` directory exists); then the same command again, which resumes: the last
  checkpoint's tensors and position, and the final metrics, must equal the undisturbed
  run's;
* ``export``: then export again: every file must equal the undisturbed export's;
* ``serve``: the server mid-requests; a new server must answer every request as the
  undisturbed one did.

Then the bad states, each of which must exit 2 with a message naming it: a flipped byte in
a shard (train and verify), a cardinality below the ids present (train), a full disk (a
2 MiB tmpfs, where this process may mount one) under preprocess and under training's
checkpoints, and a second preprocess into a directory another one is writing.

Prints one line per case (JSON) and a total; exits 1 if any case failed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the tests' own notion of "the same result"
from helpers import checkpoint_tensors, dataset_state  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
TRAIN = ["--config", "configs/tiny.toml", "--data.batch_size=64", "--train.log_every=20",
         "--model.embedding_dim=8", "--model.dense_arch_layer_sizes=[16,8]",
         "--model.over_arch_layer_sizes=[16,1]", "--eval.batch_size=100", "--data.prefetch=0",
         "--train.epochs=2", "--train.checkpoint_every=15", "--train.keep_checkpoints=0"]


def run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def last_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    return f" ({lines[-1][:300]})" if lines else ""


def dlrm(*args: str) -> list[str]:
    return [sys.executable, "-m", "dlrm", *args]


def start(args: list[str]) -> subprocess.Popen:
    """A command in its own process group (so that the group can be killed)."""
    return subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                kids = Path(f"/proc/{p}/task/{task}/children").read_text().split()
                for k in map(int, kids):
                    if k not in out:
                        out.add(k)
                        todo.append(k)
        except OSError:
            pass
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# ------------------------------------------------------------------ what results are


def training_result(run_dir: Path, scratch: Path) -> dict:
    last = sorted((run_dir / "checkpoints").glob("step-*[0-9]"))[-1]
    marker = json.loads((last / "COMPLETE.json").read_text())
    metrics = {k: v for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               for k, v in json.loads(line).items() if k.startswith("eval/")}
    return {"checkpoint": last.name, "position": marker["position"], "metrics": metrics,
            "tensors": checkpoint_tensors(last, scratch)}


def same_training(a: dict, b: dict) -> str | None:
    """None if two training results agree; else what differs."""
    for key in ("checkpoint", "position"):
        if a[key] != b[key]:
            return f"{key} differs: {a[key]!r} vs {b[key]!r}"[:300]
    if a["metrics"].keys() != b["metrics"].keys():
        return "other metrics"
    for k, v in a["metrics"].items():
        if abs(v - b["metrics"][k]) > 1e-6:
            return f"{k}: {v} vs {b['metrics'][k]}"
    if a["tensors"].keys() != b["tensors"].keys():
        return "other tensors"
    for k, t in a["tensors"].items():
        if not torch.allclose(t, b["tensors"][k], rtol=1e-5, atol=1e-6):
            return f"tensor {k} differs"
    return None


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file()}


class Server:
    def __init__(self, model: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = start(dlrm("serve", "--model", str(model), "--port", str(self.port)))
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if self.post("/health", None)[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the server did not come up")

    def post(self, path: str, body: object) -> tuple[int, object]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            if body is None:
                conn.request("GET", path)
            else:
                conn.request("POST", path, body=json.dumps(body).encode(),
                             headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"{}")
        finally:
            conn.close()


def requests_of(raw_day: Path, n: int) -> list[dict]:
    """``n`` /predict bodies of 8 raw rows each (lists of fields, the input's order)."""
    rows = [line.split("\t") for line in raw_day.read_text().splitlines()[: 8 * n]]
    return [{"rows": rows[8 * i: 8 * i + 8]} for i in range(n)]


# ------------------------------------------------------------------ the matrix


class Matrix:
    def __init__(self, work: Path, repeats: int, rows_per_day: int, rng: random.Random) -> None:
        self.work, self.repeats, self.rng = work, repeats, rng
        self.results: list[dict] = []
        raw = work / "raw"
        out = run(dlrm("synth", "--out", str(raw), "--days", "3",
                       "--rows-per-day", str(rows_per_day), "--seed", "1"))
        assert out.returncode == 0, out.stderr
        self.inputs = [str(raw / f"day_{d}") for d in range(3)]
        self.raw_test = raw / "day_2"

    def record(self, case: str, ok: bool, detail: str, **extra: object) -> None:
        line = {"case": case, "ok": ok, "detail": detail, **extra}
        self.results.append(line)
        print(json.dumps(line), flush=True)

    def timed(self, args: list[str]) -> float:
        t0 = time.perf_counter()
        out = run(args)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {out.returncode}: {out.stderr[-2000:]}")
        return time.perf_counter() - t0

    # -- undisturbed runs
    def preprocess_args(self, out: Path) -> list[str]:
        return dlrm("preprocess", "--input", *self.inputs, "--out", str(out), "--workers", "2",
                    "--chunk-mb", "0.25")

    def train_args(self, data: Path, run_dir: Path) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", "-m", "dlrm", "train", *TRAIN, f"--data.path={data}",
                "--run-dir", str(run_dir)]

    def baselines(self) -> None:
        w = self.work
        self.t_pre = self.timed(self.preprocess_args(w / "data"))
        self.data_state = dataset_state(w / "data")
        self.t_train = self.timed(self.train_args(w / "data", w / "run"))
        self.trained = training_result(w / "run", w)
        self.checkpoint = w / "run" / "checkpoints" / self.trained["checkpoint"]
        self.t_export = self.timed(dlrm("export", "--checkpoint", str(self.checkpoint), "--out",
                                        str(w / "model")))
        self.model = files_of(w / "model")
        self.requests = requests_of(self.raw_test, 40)
        server = Server(w / "model")
        try:
            self.answers = [server.post("/predict", r) for r in self.requests]
        finally:
            kill_group(server.proc)
        print(json.dumps({"event": "baselines", "preprocess_s": round(self.t_pre, 1),
                          "train_s": round(self.t_train, 1), "export_s": round(self.t_export, 1),
                          "checkpoint": self.checkpoint.name}), flush=True)

    def moment(self, seconds: float) -> float:
        return self.rng.uniform(0.05, 0.95) * seconds

    # -- kills
    def kill_preprocess(self, i: int) -> None:
        out = self.work / f"pre-{i}"
        proc = start(self.preprocess_args(out))
        time.sleep(self.moment(self.t_pre))
        alone = i % 2 == 0
        workers = descendants(proc.pid)
        if alone:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        else:
            kill_group(proc)
        time.sleep(1.0)
        orphans = [p for p in workers if alive(p)]
        for p in orphans:
            os.kill(p, signal.SIGKILL)
        rerun = run(self.preprocess_args(out))
        same = rerun.returncode == 0 and dataset_state(out) == self.data_state
        self.record("kill preprocess" + (" driver" if alone else " group"), same and not orphans,
                    f"orphans {len(orphans)}, rerun exit {rerun.returncode}, dataset "
                    f"{'equal' if same else 'DIFFERENT'}{last_line(rerun) if not same else ''}")
        shutil.rmtree(out, ignore_errors=True)

    def kill_training(self, i: int, how: str) -> None:
        run_dir = self.work / f"{how}-{i}"
        proc = start(self.train_args(self.work / "data", run_dir))
        if how == "checkpoint":
            deadline = time.time() + 300
            partial = run_dir / "checkpoints"
            while time.time() < deadline and proc.poll() is None and not (
                    partial.is_dir() and any(p.suffix == ".partial" for p in partial.iterdir())):
                time.sleep(0.002)
            time.sleep(self.rng.uniform(0, 0.05))
        else:
            time.sleep(self.moment(self.t_train))
        if how == "train-rank":
            ranks = [p for p in descendants(proc.pid)
                     if b"RANK=1" in Path(f"/proc/{p}/environ").read_bytes().split(b"\0")]
            for p in ranks[:1]:
                os.kill(p, signal.SIGKILL)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                pass
        kill_group(proc)
        rerun = run(self.train_args(self.work / "data", run_dir))
        if rerun.returncode != 0:
            self.record(how, False, f"rerun exit {rerun.returncode}: {rerun.stderr[-300:]}")
            return
        diff = same_training(training_result(run_dir, self.work), self.trained)
        self.record(how, diff is None, diff or "resumed; last checkpoint, tensors, metrics "
                    "equal")
        shutil.rmtree(run_dir, ignore_errors=True)

    def kill_export(self, i: int) -> None:
        out = self.work / f"model-{i}"
        proc = start(dlrm("export", "--checkpoint", str(self.checkpoint), "--out", str(out)))
        time.sleep(self.moment(self.t_export))
        kill_group(proc)
        rerun = run(dlrm("export", "--checkpoint", str(self.checkpoint), "--out", str(out)))
        same = rerun.returncode == 0 and files_of(out) == self.model
        self.record("export", same, f"rerun exit {rerun.returncode}, model "
                    f"{'equal' if same else 'DIFFERENT'}{last_line(rerun) if not same else ''}")
        shutil.rmtree(out, ignore_errors=True)

    def kill_serve(self, i: int) -> None:
        server = Server(self.work / "model")
        served = []
        stop_at = self.rng.randrange(1, len(self.requests))
        for k, r in enumerate(self.requests):
            if k == stop_at:
                kill_group(server.proc)
                break
            served.append(server.post("/predict", r))
        again = Server(self.work / "model")
        try:
            answers = [again.post("/predict", r) for r in self.requests]
        finally:
            kill_group(again.proc)
        ok = served == self.answers[:len(served)] and answers == self.answers
        self.record("serve", ok, f"killed after {len(served)} requests; the new server's "
                    f"{len(answers)} answers {'equal' if ok else 'DIFFER'}")

    # -- bad states
    def expect_2(self, case: str, args: list[str], want: str) -> None:
        out = run(args)
        ok = out.returncode == 2 and want in out.stderr and "Traceback" not in out.stderr
        last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ""
        self.record(case, ok, f"exit {out.returncode}: {last[:300]}")

    def bad_states(self) -> None:
        w = self.work
        manifest = json.loads((w / "data" / "manifest.json").read_text())
        bad = Path(shutil.copytree(w / "data", w / "bad-flip"))
        shard = bad / manifest["sources"][1]["files"][0]["path"]
        data = bytearray(shard.read_bytes())
        data[self.rng.randrange(len(data) // 10, len(data) * 9 // 10)] ^= 0x04
        shard.write_bytes(bytes(data))
        self.expect_2("corrupt shard: train", dlrm("train", *TRAIN, f"--data.path={bad}",
                                                   "--run-dir", str(w / "bad-run-1")), str(shard))
        self.expect_2("corrupt shard: verify", dlrm("verify", str(bad)), str(shard))

        bad = Path(shutil.copytree(w / "data", w / "bad-card"))
        cards = manifest["cardinalities"]
        f = max(range(len(cards)), key=lambda j: cards[j])
        edited = dict(manifest, cardinalities=[*cards[:f], 5, *cards[f + 1:]])
        (bad / "manifest.json").write_text(json.dumps(edited))
        self.expect_2("wrong cardinality: train",
                      dlrm("train", *TRAIN, f"--data.path={bad}", "--run-dir",
                           str(w / "bad-run-2")),
                      f"feature {manifest['schema']['sparse'][f]} has id")

        self.full_disk()

        out = w / "two"
        first = start(self.preprocess_args(out))
        deadline = time.time() + 60
        while time.time() < deadline and not (out / "_work" / "plan.json").exists():
            time.sleep(0.01)
        self.expect_2("two preprocess runs, one --out", self.preprocess_args(out),
                      f"being written by another dlrm preprocess (pid {first.pid}")
        first.wait()
        state = dataset_state(out) == self.data_state
        self.record("two preprocess runs: the first's dataset", first.returncode == 0 and state,
                    f"first exit {first.returncode}, dataset {'equal' if state else 'DIFFERENT'}")

    def full_disk(self) -> None:
        disk = self.work / "full"
        disk.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                                 capture_output=True).returncode == 0
        if not mounted:
            self.record("full disk", True, "skipped: cannot mount a tmpfs here (not root)",
                        skipped=True)
            return
        try:
            self.expect_2("full disk: preprocess", self.preprocess_args(disk / "data"),
                          "free on")  # refused up front, before anything is written
            shutil.rmtree(disk / "data", ignore_errors=True)
            self.expect_2("full disk: checkpoint",
                          dlrm("train", *TRAIN, f"--data.path={self.work / 'data'}",
                               "--run-dir", str(disk / "run")), "disk full")
            left = [str(p) for p in disk.rglob("*.partial")]
            self.record("full disk: no .partial left", not left, f"left: {left}")
        finally:
            subprocess.run(["umount", str(disk)], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows-per-day", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fault-matrix-"))
    t0 = time.time()
    try:
        m = Matrix(work, args.repeats, args.rows_per_day, random.Random(args.seed))
        m.baselines()
        kills: list[tuple[str, Callable[[int], None]]] = [
            ("preprocess", m.kill_preprocess),
            ("train-rank", lambda i: m.kill_training(i, "train-rank")),
            ("train-job", lambda i: m.kill_training(i, "train-job")),
            ("checkpoint", lambda i: m.kill_training(i, "checkpoint")),
            ("export", m.kill_export), ("serve", m.kill_serve)]
        for _, kill in kills:
            for i in range(args.repeats):
                try:
                    kill(i)
                except Exception as e:  # a case that breaks is a failed case, not the end
                    m.record(_, False, f"{type(e).__name__}: {e}"[:300])
        m.bad_states()
        failed = [r for r in m.results if not r["ok"]]
        print(json.dumps({"event": "total", "cases": len(m.results),
                          "passed": len(m.results) - len(failed), "failed": len(failed),
                          "skipped": sum(1 for r in m.results if r.get("skipped")),
                          "minutes": round((time.time() - t0) / 60, 1)}))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

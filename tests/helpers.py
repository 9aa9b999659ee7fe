"""Plain helpers shared by the tests (fixtures stay in each test file or conftest.py)."""

from __future__ import annotations

import csv
import gzip
import http.client
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from dlrm.schema.features import NUM_DENSE, NUM_SPARSE


def tsv_row(label: str = "1", dense: Iterable[str] | None = None,
            cats: Iterable[str] | None = None) -> str:
    """One Criteo TSV line (no newline); dense / categorical fields default to "1"."""
    dense = ["1"] * NUM_DENSE if dense is None else list(dense)
    cats = ["1"] * NUM_SPARSE if cats is None else list(cats)
    assert len(dense) == NUM_DENSE and len(cats) == NUM_SPARSE
    return "\t".join([label, *dense, *cats])


def write_lines(path: Path, lines: Iterable[str]) -> Path:
    """Writes ``lines``, each ended by a newline; returns ``path``."""
    path.write_text("".join(line + "\n" for line in lines))
    return path


def read_units(dataset: Path, units: Iterable[dict]) -> pa.Table:
    """The rows of a dataset's sources or periods (its manifest's entries), in order."""
    return pa.concat_tables([pq.read_table(dataset / f["path"]) for u in units
                             for f in u["files"]])


def dataset_state(out: Path) -> dict[str, object]:
    """Everything a dataset holds, timings aside."""
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("seconds")
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
             if p.is_file() and p.suffix != ".parquet" and p.name != "manifest.json"}
    tables = {str(p.relative_to(out)): pq.read_table(p) for p in sorted(out.rglob("*.parquet"))}
    return {"manifest": manifest, "files": files, "tables": tables}


def quiet(*_: object) -> None:
    """A ``log`` callback that drops the preprocessor's messages."""


REPO = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], timeout: int, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-5000:]}"
            f"\n--- stderr\n{proc.stderr[-10000:]}"
        )
    return proc


def dlrm(*args: str, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m dlrm ARGS`` (world size 1 for train); raises with its output on failure
    (unless not ``check``)."""
    return _run([sys.executable, "-m", "dlrm", *args], timeout, check)


def torchrun(args: list[str], nproc: int = 2, timeout: int = 300,
             check: bool = True) -> subprocess.CompletedProcess:
    """The real ``torchrun --standalone --nproc_per_node N ARGS`` (gloo on CPU)."""
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}", *args], timeout, check)


def checkpoint_tensors(path: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint, whole (however many ranks wrote it)."""
    out = tmp / f"{path.parent.parent.name}-{path.name}.pt"
    dcp_to_torch_save(path, out)
    state = torch.load(out, weights_only=False)
    flat = {}

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, torch.Tensor):
            flat[prefix] = node
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}/{k}", v)

    walk("", state)
    return flat


GENRES = ["Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Drama",
          "Fantasy", "Horror", "Musical", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
ML_HEADER = "user_id,movie_id,rating,timestamp,title,genres,gender,age,occupation,zip"


def _movielens_world() -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """The planted users' and movies' biases and each movie's genres."""
    world = np.random.default_rng(1234)
    user_bias, movie_bias = world.normal(0, 1, 150), world.normal(0, 1, 200)
    genres = [world.choice(len(GENRES), world.integers(1, 4), replace=False) for _ in range(200)]
    return user_bias, movie_bias, genres


def movielens_rows(rows: int, seed: int, start: int = 975_628_800) -> list[list]:
    """Ratings from user and movie effects (the genres follow the movie): a rating of 4+
    is well predictable. One a minute from ``start`` (default 2000-12-01)."""
    rng = np.random.default_rng(seed)
    user_bias, movie_bias, genres = _movielens_world()
    out = []
    for i in range(rows):
        u, m = int(rng.integers(150)), int(rng.integers(200))
        score = 3.3 + user_bias[u] + movie_bias[m] + rng.normal(0, 0.6)
        out.append([u + 1, m + 1, int(np.clip(np.round(score), 1, 5)), start + 60 * i,
                    f"Movie {m}, The ({1950 + m % 50})", "|".join(GENRES[g] for g in genres[m]),
                    "MF"[u % 2], [1, 18, 25, 35, 45, 50, 56][u % 7], u % 21,
                    f"{10000 + u * 37}" if u % 3 else f"{10000 + u}-1234"])
    return out


def movielens_truth(rows: list[list]) -> dict[str, np.ndarray]:
    """The planted model on ``movielens_rows``: P(rating >= 4) of each row (the score
    3.3 + user bias + movie bias + N(0, 0.6) rounds to 4 or more where it is >= 3.5),
    and the user's and the movie's bias alone (first-order scores, each blind to the
    other effect)."""
    user_bias, movie_bias, _ = _movielens_world()
    u = np.array([r[0] - 1 for r in rows])
    m = np.array([r[1] - 1 for r in rows])
    z = (user_bias[u] + movie_bias[m] - 0.2) / 0.6
    p = 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    return {"p": p, "user": user_bias[u], "movie": movie_bias[m]}


def write_csv(path, header: str, rows: list[list], extra_lines: list[str] = ()) -> None:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", newline="") as f:
        f.write(header + "\n")
        writer = csv.writer(f)
        writer.writerows(rows)
        for line in extra_lines:
            f.write(line + "\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real ``dlrm serve`` of ``model`` on a free loopback port, up once /health answers;
    ``stop`` sends SIGTERM and returns the exit code."""

    def __init__(self, model, *args: str) -> None:
        if not any(a.startswith("--workers") for a in args):  # one process, unless asked:
            args = ("--workers", "1", *args)  # what these tests look at is per process
        self.port = _free_port()
        # Files, not pipes: the server writes a line per request, which a pipe nobody
        # reads would hold until it blocks.
        self.stdout = tempfile.NamedTemporaryFile("w+", suffix=".stdout")
        self.stderr = tempfile.NamedTemporaryFile("w+", suffix=".stderr")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dlrm", "serve", "--model", str(model), "--port",
             str(self.port), *args], cwd=REPO, stdout=self.stdout, stderr=self.stderr,
            text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
            assert self.proc.poll() is None, self.output()
        raise AssertionError("the server did not come up")

    def output(self) -> tuple[str, str]:
        """(stdout, stderr) so far."""
        return (Path(self.stdout.name).read_text(), Path(self.stderr.name).read_text())

    def raw(self, method: str, path: str, body: bytes | None = None,
            timeout: float = 60) -> tuple[int, bytes]:
        """(status, body) of one request on a connection of its own."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body,
                         headers={"Content-Type": "application/json"} if body else {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def request(self, method: str, path: str, body: bytes | None = None,
                timeout: float = 60) -> tuple[int, dict]:
        status, data = self.raw(method, path, body, timeout)
        return status, json.loads(data or b"{}")

    def get_text(self, path: str) -> str:
        status, data = self.raw("GET", path)
        assert status == 200, (status, data)
        return data.decode()

    def get(self, path: str) -> tuple[int, dict]:
        return self.request("GET", path)

    def post(self, path: str, payload, timeout: float = 60) -> tuple[int, dict]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.request("POST", path, body, timeout)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def mount_tmpfs(path: Path, size: int) -> Path:
    """A real file system of ``size`` bytes (tmpfs) mounted at ``path`` (made here), to
    fill; the test is skipped where this process may not mount one (not root)."""
    import pytest

    path.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    return path


def umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], check=False)


def children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e[5:]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def train_killing_a_rank(args: list[str], run: Path, after: str, rank: int = 1) -> str:
    """``dlrm train ARGS --run-dir RUN`` on 2 ranks under torchrun with one restart allowed,
    ``rank`` SIGKILLed once checkpoint ``after`` (``step-000000010``) exists; its output
    (AssertionError unless the job then succeeds)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    agent = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "--max-restarts=1", "-m", "dlrm", "train", *args, "--run-dir", str(run)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / after).exists():
            assert time.time() < deadline and agent.poll() is None
            time.sleep(0.005)
        (victim,) = [p for p in children(agent.pid) if rank_of(p) == rank]
        os.kill(victim, signal.SIGKILL)
        out, _ = agent.communicate(timeout=300)
    finally:
        if agent.poll() is None:  # a hung job must not outlive the test
            for pid in children(agent.pid):
                os.kill(pid, signal.SIGKILL)
            agent.kill()
    assert agent.returncode == 0, out[-5000:]
    return out

"""``dlrm serve --workers 2``: two real server processes on one port under a supervisor.
Both answer; /metrics sums them; a reload (HTTP or SIGHUP) reaches both before it is
answered, an incompatible model is refused by both; a killed worker is replaced; SIGTERM
stops them all, exit 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
from helpers import Server
from prometheus_client.parser import text_string_to_metric_families

from dlrm.serve.workers import auto_workers


def _healths(server: Server, at_least: int = 40) -> dict[int, dict]:
    """The last /health of each worker met in ``at_least`` connections (a new one each)."""
    seen: dict[int, dict] = {}
    for _ in range(at_least):
        status, got = server.get("/health")
        assert status == 200, got
        seen[got["pid"]] = got
    return seen


def _until(what, timeout: float = 90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError("timed out")


def _events(server: Server, kind: str) -> list[dict]:
    lines = [json.loads(line) for line in server.output()[0].splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("event") == kind]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_workers_answer_sum_their_metrics_and_reload_together(exported, reloadable):
    model_dir, rows, probs = exported
    new_dir, new_probs, other = reloadable
    server = Server(model_dir, "--workers", "2")
    try:
        _until(lambda: len(_healths(server)) == 2)
        _until(lambda: all(server.get("/ready")[0] == 200 for _ in range(20)))
        before = _healths(server)

        results: dict[int, list] = {}

        def client(k: int) -> None:
            for j in range(10):
                n = 10 * k + j
                status, got = server.post("/predict", {"rows": rows[n:n + 1]})
                assert status == 200, got
                results[n] = got["predictions"]

        threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        np.testing.assert_allclose([results[n][0] for n in range(60)], probs[:60], rtol=0,
                                   atol=1e-6)
        served = {pid: h["predict_requests"] - before[pid]["predict_requests"]
                  for pid, h in _healths(server).items()}
        assert sum(served.values()) == 60 and min(served.values()) > 0, served  # both did
        families = {f.name: f for f in text_string_to_metric_families(
            server.get_text("/metrics"))}
        total = {(s.labels["endpoint"], s.labels["status"]): s.value
                 for s in families["dlrm_requests"].samples if s.name == "dlrm_requests_total"}
        assert total[("/predict", "200")] == 60  # both workers' counts, summed

        status, got = server.post("/admin/reload", {"model": str(new_dir)})
        assert status == 200 and got["workers"] == 2, got
        versions = {h["version"] for h in _healths(server).values()}
        assert versions == {got["version"]}  # both swapped before the answer came
        for _ in range(10):
            np.testing.assert_allclose(server.post("/predict", {"rows": rows[:4]})[1][
                "predictions"], new_probs, rtol=0, atol=1e-6)

        refused = server.post("/admin/reload", {"model": str(other)})
        assert refused[0] == 409 and "label" in refused[1]["error"], refused
        assert {h["version"] for h in _healths(server).values()} == {got["version"]}

        server.proc.send_signal(signal.SIGHUP)  # back to the directory it started with
        _until(lambda: len(_events(server, "reload")) == 2)
        assert {h["version"] for h in _healths(server).values()} == {got["previous"]}

        victim = next(iter(_healths(server)))
        os.kill(victim, signal.SIGKILL)
        _until(lambda: _events(server, "worker_exited"))
        pids = _until(lambda: (lambda p: p if len(p) == 2 and victim not in p else None)(
            set(_healths(server))))
        _until(lambda: all(server.get("/ready")[0] == 200 for _ in range(20)))
    finally:
        code = server.stop()
    assert code == 0, server.output()
    assert _events(server, "worker_exited")[0]["pid"] == victim
    assert not any(_alive(pid) for pid in pids)  # every worker stopped with it


def test_workers_stop_when_their_supervisor_is_killed(exported):
    model_dir, _, _ = exported
    server = Server(model_dir, "--workers", "2")
    try:
        pids = _until(lambda: (lambda p: p if len(p) == 2 else None)(set(_healths(server))))
        server.proc.kill()  # SIGKILL: nobody forwards anything
        server.proc.wait(timeout=30)
        _until(lambda: not any(_alive(pid) for pid in pids), timeout=60)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()


def test_auto_workers_are_one_per_core_as_memory_allows(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    with open(model / "tables.bin", "wb") as f:
        f.truncate(10 << 30)  # a 10 GiB model (sparse: no disk taken)
    gib = 1 << 30
    assert auto_workers(model, cores=8, memory=64 * gib) == 3  # 32 GiB / 10.5 GiB
    assert auto_workers(model, cores=2, memory=64 * gib) == 2
    assert auto_workers(model, cores=8, memory=16 * gib) == 1  # never none
    (model / "tables.bin").unlink()
    assert auto_workers(model, cores=8, memory=64 * gib) == 8  # a tiny model: every core


def test_workers_must_be_auto_or_a_positive_number(exported):
    model_dir, _, _ = exported
    for bad in ("0", "two"):
        proc = subprocess.run([sys.executable, "-m", "dlrm", "serve", "--model", str(model_dir),
                               "--workers", bad], capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "--workers" in proc.stderr, proc.stderr

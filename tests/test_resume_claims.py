"""Claims of resume and failure handling, run for real (2 torchrun ranks, gloo):
SIGTERM of one rank stops both at one agreed step with one checkpoint; a run stopped
mid-epoch resumes on another rank count with the rest of its epoch; a stalled rank makes
the others fail within ``train.collective_timeout_s`` instead of hanging; a resumed run
hides from TensorBoard what the killed try logged past its checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, children, dlrm, rank_of, torchrun
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_resume import SMALL, metrics, newest, position

ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _starts(out: str) -> list[dict]:
    return [json.loads(x) for x in out.splitlines() if x.startswith('{"event": "start"')]


def _wait_for_metrics(run: Path, proc: subprocess.Popen, step: int = 1) -> None:
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() or not any(
            r["step"] >= step for r in metrics(run) if "train/loss" in r):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.005)


def _ranks(agent: subprocess.Popen) -> dict[int, int]:
    return {rank_of(p): p for p in children(agent.pid)}


def _kill_all(agent: subprocess.Popen) -> None:
    if agent.poll() is None:  # a hung job must not outlive the test
        for pid in children(agent.pid):
            os.kill(pid, signal.SIGKILL)
        agent.kill()
        agent.wait()


@pytest.fixture(scope="module")
def preempted(small_dataset, tmp_path_factory):
    """A 2-rank run of one epoch (125 steps a rank) whose rank 1 alone got SIGTERM early
    in the epoch: (run directory, the job's output, its exit code)."""
    run = tmp_path_factory.mktemp("preempted") / "run"
    agent = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "dlrm", "train", *SMALL, f"--data.path={small_dataset}", "--run-dir", str(run)],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_metrics(run, agent)
        os.kill(_ranks(agent)[1], signal.SIGTERM)
        out, _ = agent.communicate(timeout=120)
    finally:
        _kill_all(agent)
    return run, out, agent.returncode


@pytest.mark.timeout(300)
def test_sigterm_of_one_rank_stops_every_rank_at_one_step_and_the_rerun_resumes(
        preempted, small_dataset, tmp_path):
    run, out, code = preempted
    assert code == 0, out[-5000:]  # both ranks exit 0, so does torchrun
    (stopped,) = [json.loads(x) for x in out.splitlines() if '"event": "preempted"' in x]
    saved = newest(run)
    assert [p.name for p in (run / "checkpoints").iterdir()] == [saved.name]  # one, complete
    assert position(saved)["step"] == stopped["step"] < 125
    assert position(saved)["world_size"] == 2 and len(position(saved)["rng"]) == 2
    files = json.loads((saved / "COMPLETE.json").read_text())["files"]
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(files)  # both ranks saved into it

    again = tmp_path / "run"
    shutil.copytree(run, again)
    out = torchrun(["-m", "dlrm", "train", *SMALL, f"--data.path={small_dataset}",
                    "--run-dir", str(again)]).stdout
    (start,) = _starts(out)
    assert start["resumed_from"] == str(again / "checkpoints" / saved.name)
    assert start["step"] == stopped["step"]
    end = position(newest(again))
    assert (end["step"], end["epoch"], end["batch"]) == (125, 1, 0)
    steps = [r["step"] for r in metrics(again) if "train/loss" in r]
    assert steps[-1] == 125


@pytest.mark.timeout(300)
def test_a_run_stopped_mid_epoch_resumes_on_one_rank_with_the_rest_of_its_epoch(
        preempted, small_dataset, tmp_path):
    """Written by 2 ranks at step S (S batches of each rank's half), read by 1: the epoch
    resumes at the same fraction of the data, batch 2S of 250, and trains the other
    250 - 2S batches; steps go on from S."""
    run, out, code = preempted
    assert code == 0, out[-5000:]
    saved = newest(run)
    s = position(saved)["step"]
    assert 0 < s < 125
    again = tmp_path / "run"
    shutil.copytree(run, again)
    proc = dlrm("train", *SMALL, f"--data.path={small_dataset}", "--run-dir", str(again))
    (start,) = _starts(proc.stdout)
    assert start["resumed_from"] == str(again / "checkpoints" / saved.name)
    assert (start["step"], start["world_size"], start["steps_per_epoch"]) == (s, 1, 250)
    assert f"starts at batch {2 * s} of each rank" in proc.stderr
    end = position(newest(again))
    assert (end["step"], end["epoch"], end["batch"], end["world_size"]) == (s + 250 - 2 * s,
                                                                            1, 0, 1)
    (done,) = [json.loads(x) for x in proc.stdout.splitlines() if '"event": "done"' in x]
    assert done["samples"] == (250 - 2 * s) * 32  # the rest of the epoch, and no more
    resumed = [r["step"] for r in metrics(again) if "train/loss" in r][-(250 - 2 * s) // 10:]
    assert resumed == sorted(set(resumed)) and resumed[0] > s
    assert 0.55 < done["test_auc"] < 1


@pytest.mark.timeout(180)
def test_a_stalled_rank_fails_the_job_within_the_collective_timeout(small_dataset, tmp_path):
    run = tmp_path / "run"
    agent = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "dlrm", "train", *SMALL, f"--data.path={small_dataset}", "--train.epochs=3",
         "--train.collective_timeout_s=5", "--run-dir", str(run)],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_metrics(run, agent)
        ranks = _ranks(agent)
        os.kill(ranks[1], signal.SIGSTOP)  # alive, holding its sockets, answering nothing
        stopped = time.time()
        while Path(f"/proc/{ranks[0]}").exists() and \
                Path(f"/proc/{ranks[0]}/stat").read_text().split()[2] != "Z":
            assert time.time() - stopped < 60, "rank 0 still waits a minute after the stall"
            time.sleep(0.05)
        waited = time.time() - stopped
        os.kill(ranks[1], signal.SIGKILL)
        out, _ = agent.communicate(timeout=60)
    finally:
        _kill_all(agent)
    assert 4 < waited < 5 + 15, waited
    assert agent.returncode != 0
    assert "Timed out waiting 5000ms" in out or "Application timeout" in out, out[-5000:]


@pytest.mark.timeout(120)
def test_the_preemption_agreement_is_bounded_by_the_collective_timeout(tmp_path):
    """Its gloo group is one of its own, which torch gives a 30-minute timeout unless told."""
    out = tmp_path / "out.json"
    torchrun(["tests/dist_preemption_timeout.py", str(out)], timeout=100, check=False)
    got = json.loads(out.read_text())
    assert got["error"] and got["seconds"] < 3 + 7, got


@pytest.mark.timeout(300)
def test_a_resumed_run_hides_what_the_killed_try_logged_past_its_checkpoint(small_dataset,
                                                                           tmp_path):
    run = tmp_path / "run"
    args = [*SMALL, f"--data.path={small_dataset}", "--train.checkpoint_every=40",
            "--train.limit_train_batches=120", "--train.tensorboard=true", "--run-dir", str(run)]
    proc = subprocess.Popen([sys.executable, "-m", "dlrm", "train", *args], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_metrics(run, proc, step=60)
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    killed = [r["step"] for r in metrics(run) if "train/loss" in r]
    out = dlrm("train", *args).stdout
    (start,) = _starts(out)
    resumed = start["step"]
    assert resumed >= 40 and max(killed) > resumed  # the killed try logged past it

    raw = EventAccumulator(str(run / "tb"), purge_orphaned_data=False)
    raw.Reload()
    raw_steps = [e.step for e in raw.Scalars("train/loss")]
    assert len(raw_steps) > len(set(raw_steps))  # both tries' points are in the files

    shown = EventAccumulator(str(run / "tb"))  # as TensorBoard reads them
    shown.Reload()
    points = [(e.step, e.value) for e in shown.Scalars("train/loss")]
    assert [s for s, _ in points] == list(range(10, 121, 10))  # each step once, in order
    final = {r["step"]: r["train/loss"] for r in metrics(run) if "train/loss" in r}
    assert [v for _, v in points] == pytest.approx([final[s] for s, _ in points], abs=1e-6)

"""Launching for real: the torchx component on the local_cwd scheduler, and two torchrun
"nodes" on this machine (c10d rendezvous on loopback) against one node."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, checkpoint_tensors, torchrun

SMALL = ["--config", "configs/tiny.toml", "--data.batch_size=64", "--train.log_every=10",
         "--model.embedding_dim=8", "--model.dense_arch_layer_sizes=[16,8]",
         "--model.over_arch_layer_sizes=[16,1]", "--train.limit_train_batches=30",
         "--eval.limit_batches=5"]


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)  # torchrun / torchx of this environment
    return dict(os.environ, PYTHONPATH=str(REPO), PATH=f"{bin_dir}:{os.environ['PATH']}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _final(run: Path) -> tuple[Path, dict]:
    ckpt = sorted((run / "checkpoints").glob("step-*[0-9]"))[-1]
    test = json.loads((run / "eval" / "test.json").read_text())["metrics"]
    return ckpt, test


def test_torchx_component_runs_on_local_cwd(small_dataset, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "torchx.cli.main", "run", "-s", "local_cwd",
         "-cfg", f"log_dir={tmp_path / 'torchx'}", "dlrm/components.py:train", "-j", "1x2",
         "--", *SMALL, f"--data.path={small_dataset}", "--run-dir", str(run)],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "SUCCEEDED" in proc.stderr + proc.stdout
    assert {"config.toml", "plan.txt", "metrics.jsonl", "checkpoints", "eval"} <= \
        {p.name for p in run.iterdir()}
    ckpt, test = _final(run)
    assert ckpt.name == "step-000000030" and (ckpt / "COMPLETE.json").is_file()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("train/samples_per_sec" in r for r in records) and 0.5 < test["auc"] <= 1
    logs = proc.stdout + proc.stderr  # torchx relays the job's lines, prefixed
    starts = [json.loads(line[line.index('{"event": "start"'):])
              for line in logs.splitlines() if '{"event": "start"' in line]
    assert [s["world_size"] for s in starts] == [2]


def test_two_torchrun_nodes_train_like_one(small_dataset, tmp_path):
    common = [*SMALL, f"--data.path={small_dataset}"]
    one = tmp_path / "one"
    torchrun(["-m", "dlrm", "train", *common, "--run-dir", str(one)])

    two, port = tmp_path / "two", _free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
         f"--node_rank={n}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
         "--rdzv_id=two-nodes", "-m", "dlrm", "train", *common, "--run-dir", str(two)],
        cwd=REPO, env=dict(_env(), OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for n in range(2)]
    outs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outs)
    starts = [json.loads(line) for o in outs for line in o.splitlines()
              if line.startswith('{"event": "start"')]
    assert len(starts) == 1 and starts[0]["world_size"] == 2  # one world of 2, one rank 0

    (ckpt_one, test_one), (ckpt_two, test_two) = _final(one), _final(two)
    assert ckpt_one.name == ckpt_two.name
    a, b = checkpoint_tensors(ckpt_one, tmp_path), checkpoint_tensors(ckpt_two, tmp_path)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    for key, value in test_one.items():
        assert test_two[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def _appdef(fn_name: str, *cli: str):
    """The AppDef torchx builds for ``torchx run dlrm/components.py:FN CLI...``: the
    component found and its arguments parsed as the torchx CLI does."""
    from torchx.specs.builders import materialize_appdef
    from torchx.specs.finder import get_component

    component = get_component(f"{REPO / 'dlrm' / 'components.py'}:{fn_name}")
    return materialize_appdef(component.fn, list(cli))


def test_component_sizes_a_gpu_node_from_its_gpus():
    (role,) = _appdef("train", "-j", "1x8", "--gpu", "8", "--", "--config", "x.toml").roles
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (64, 8, 8 * 65536)
    assert role.num_replicas == 1


def test_component_cpu_only_keeps_the_small_default():
    for fn_name in ("train", "evaluate"):
        (role,) = _appdef(fn_name, "-j", "2x2").roles
        assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (2, 0, 8192)
        assert role.num_replicas == 2


def test_component_explicit_resources_win():
    (role,) = _appdef("train", "-j", "1x8", "--gpu", "8", "--cpu", "16").roles
    assert (role.resource.cpu, role.resource.memMB) == (16, 8 * 65536)
    (role,) = _appdef("evaluate", "--gpu", "2", "--memMB", "1000").roles
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (16, 2, 1000)


def test_component_named_resource_replaces_the_sizing():
    from torchx.specs import named_resources

    (role,) = _appdef("train", "-j", "1x8", "-h", "aws_p4d.24xlarge", "--cpu", "16").roles
    assert role.resource == named_resources["aws_p4d.24xlarge"]

"""A checkpoint that cannot be written: a real full disk (a tmpfs mounted here), a path
that cannot be made. The save fails on every rank together with one CheckpointError
naming the path and the cause, leaves no ``.partial`` behind, and `dlrm train` exits 2
with that line; a rerun with room resumes. Start-up removes stale ``.partial``s."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
import torch.distributed as dist
from helpers import dlrm, mount_tmpfs, torchrun, umount

from dlrm.config import load_config
from dlrm.errors import CheckpointError
from dlrm.train.checkpoint import Checkpointer
from dlrm.train.trainer import Trainer

SMALL = ["--config", "configs/tiny.toml", "--data.batch_size=32", "--train.log_every=10",
         "--model.embedding_dim=8", "--model.dense_arch_layer_sizes=[16,8]",
         "--model.over_arch_layer_sizes=[16,1]", "--data.prefetch=0"]


@pytest.fixture
def group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_save_on_a_full_disk_raises_naming_it_and_leaves_no_partial(group, tmp_path):
    disk = mount_tmpfs(tmp_path / "disk", 256 << 10)
    try:
        with pytest.raises(CheckpointError) as e:
            Checkpointer(disk).save(7, {"model": {"w": torch.randn(1 << 17)}}, {"step": 7})
        message = str(e.value)
        assert str(disk / "step-000000007.partial") in message
        assert "disk full (" in message and f"bytes free on {disk}" in message
        # The cause as said (torch.save's zip writer may hide the ENOSPC: "unexpected pos";
        # then the free bytes tell), on one line.
        assert "RuntimeError: " in message or "No space left on device" in message
        assert "\n" not in message
        assert list(disk.iterdir()) == []  # the partial checkpoint is gone
        # With room, the same directory takes the checkpoint.
        path = Checkpointer(disk).save(7, {"model": {"w": torch.randn(1000)}}, {"step": 7})
        assert path.name == "step-000000007" and list(disk.iterdir()) == [path]
    finally:
        umount(disk)


@pytest.mark.timeout(120)
def test_a_save_that_fails_on_one_rank_fails_on_every_rank(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    directory, out = tmp_path / "file" / "checkpoints", tmp_path / "out.json"
    torchrun(["tests/dist_checkpoint_fails.py", str(directory), str(out)], timeout=120)
    errors = json.loads(out.read_text())
    assert len(errors) == 2 and errors[0] == errors[1]  # rank 1 heard of rank 0's failure
    assert str(directory / "step-000000003.partial") in errors[0]
    assert "Not a directory" in errors[0] and "disk full" not in errors[0]


def test_start_up_removes_stale_partial_checkpoints(small_dataset, tmp_path, caplog):
    run = tmp_path / "run"
    stale = [run / "checkpoints" / "step-000000040.partial", run / "checkpoints" / "best.partial"]
    for p in stale:
        p.mkdir(parents=True)
        (p / "__0_0.distcp").write_bytes(b"x" * 1000)
    other = run / "elsewhere.partial"  # not in its checkpoint directory: left alone
    other.mkdir()
    config = load_config(SMALL[1], [*SMALL[2:], f"--data.path={small_dataset}"])
    trainer = Trainer(config, run)
    try:
        assert not any(p.exists() for p in stale) and other.is_dir()
        for p in stale:
            assert f"removing {p}" in caplog.text
    finally:
        trainer.log.close()
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_a_full_disk_while_training_exits_2_naming_it_and_a_rerun_with_room_resumes(
        small_dataset, tmp_path):
    run = tmp_path / "run"
    # Room for one checkpoint (2.5 MB), not for a second beside it: step 40 is saved,
    # step 80 fills the disk.
    ckpts = mount_tmpfs(run / "checkpoints", 3 << 20)
    args = ["-m", "dlrm", "train", *SMALL, f"--data.path={small_dataset}",
            "--train.checkpoint_every=40", "--run-dir", str(run)]
    try:
        proc = torchrun(args, check=False)
        out = proc.stdout + proc.stderr
        errors = [line for line in out.splitlines() if line.startswith("dlrm train: error:")]
        assert len(errors) == 1, out[-5000:]  # rank 0 says it, once
        partial = ckpts / "step-000000080.partial"
        assert f"checkpoint {partial} could not be written: disk full (" in errors[0]
        assert f"bytes free on {ckpts})" in errors[0]
        assert "exitcode  : 2" in out and "[rank0]: Traceback" not in out
        assert "[rank1]: Traceback" not in out
        assert [p.name for p in ckpts.iterdir()] == ["step-000000040"]  # no .partial left

        subprocess.run(["mount", "-o", "remount,size=16m", str(ckpts)], check=True)
        out = torchrun(args).stdout
        (start,) = [json.loads(x) for x in out.splitlines() if '"event": "start"' in x]
        assert start["resumed_from"] == str(ckpts / "step-000000040") and start["step"] == 40
        assert sorted(p.name for p in ckpts.iterdir()) == [
            "step-000000080", "step-000000120", "step-000000125"]
        end = json.loads((ckpts / "step-000000125" / "COMPLETE.json").read_text())["position"]
        assert (end["step"], end["epoch"], end["batch"]) == (125, 1, 0)
        assert (run / "eval" / "test.json").is_file()
    finally:
        umount(ckpts)


@pytest.mark.timeout(300)
def test_a_full_disk_under_the_run_directory_exits_2_naming_it(small_dataset, tmp_path):
    """Not a checkpoint: the final evaluation's files (``RUN/eval/``, a 4 KiB tmpfs here,
    too small for them) fail to be written."""
    run = tmp_path / "run"
    full = mount_tmpfs(run / "eval", 4096)
    try:
        proc = dlrm("train", *SMALL, f"--data.path={small_dataset}",
                    "--train.limit_train_batches=10", "--run-dir", str(run), check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        (line,) = [x for x in proc.stderr.splitlines() if x.startswith("dlrm train: error:")]
        assert str(run) in line and "disk full (" in line and "No space left on device" in line
        assert "Traceback" not in proc.stderr
    finally:
        umount(full)

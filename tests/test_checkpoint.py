"""Checkpointer: atomic save, verification, retention, safe loading (world size 1)."""

from __future__ import annotations

import hashlib
import json
import pickle

import pytest
import torch
import torch.distributed as dist
from helpers import torchrun

from dlrm.errors import CheckpointError
from dlrm.train.checkpoint import MARKER, Checkpointer, _InPlaceSavePlanner, verify


@pytest.fixture
def group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(50, 8, generator=g)},
            "optim": {"sum": torch.rand(50, generator=g)}}


def test_save_then_load_round_trips(group, tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    path = ckpt.save(7, state(1), {"step": 7, "epoch": 0, "batches": 7})
    assert path.name == "step-000000007" and (path / MARKER).is_file()
    assert not list(tmp_path.glob("*.partial"))
    target = state(2)
    position = ckpt.load(path, target)
    assert position == {"step": 7, "epoch": 0, "batches": 7}
    torch.testing.assert_close(target, state(1), rtol=0, atol=0)


def test_tables_viewing_one_buffer_are_saved_without_a_copy(group, tmp_path):
    """fbgemm keeps a rank's tables in one buffer; DCP would copy each view whole before
    writing it (as much memory again as the tables). The planner hands it each table's
    own memory, and the checkpoint reads back the same."""
    flat = torch.randn(3000 * 8)
    tables = {"a": flat[:8000].view(1000, 8), "b": flat[8000:].view(2000, 8)}
    planner = _InPlaceSavePlanner()
    planner.set_up_planner({"model": tables}, None, True)
    for item in planner.create_local_plan().items:
        data = planner.resolve_data(item)
        assert data.untyped_storage().nbytes() == data.nbytes  # DCP copies nothing
        assert data.data_ptr() in (tables["a"].data_ptr(), tables["b"].data_ptr())

    ckpt = Checkpointer(tmp_path)
    path = ckpt.save(1, {"model": tables}, {"step": 1})
    target = {"model": {"a": torch.zeros(1000, 8), "b": torch.zeros(2000, 8)}}
    ckpt.load(path, target)
    torch.testing.assert_close(target["model"], tables, rtol=0, atol=0)


def test_retention_keeps_the_newest(group, tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in (10, 20, 30):
        ckpt.save(step, state(step), {"step": step})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000020", "step-000000030"]
    assert ckpt.latest().name == "step-000000030"


def test_latest_skips_incomplete_and_corrupt_explicit_path_is_an_error(group, tmp_path, caplog):
    ckpt = Checkpointer(tmp_path, keep=0)
    for step in (1, 2, 3):
        ckpt.save(step, state(step), {"step": step})
    newest, middle = tmp_path / "step-000000003", tmp_path / "step-000000002"
    (newest / MARKER).unlink()  # as if killed before the marker
    data = next(p for p in middle.iterdir() if p.suffix == ".distcp")
    data.write_bytes(data.read_bytes()[:-10])  # truncated
    assert ckpt.latest().name == "step-000000001"
    assert "step-000000003" in caplog.text and "step-000000002" in caplog.text

    with pytest.raises(CheckpointError, match="incomplete"):
        ckpt.load(newest, state(0))
    with pytest.raises(CheckpointError, match="truncated"):
        ckpt.load(middle, state(0))


def test_checksum_mismatch_is_detected(group, tmp_path):
    path = Checkpointer(tmp_path).save(5, state(5), {"step": 5})
    data = next(p for p in path.iterdir() if p.suffix == ".distcp")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one byte flipped
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum"):
        verify(path)


def test_metadata_that_would_run_code_is_refused(group, tmp_path):
    path = Checkpointer(tmp_path).save(5, state(5), {"step": 5})

    pwned = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(pwned)!r}, 'w').write('x')",))

    (path / ".metadata").write_bytes(pickle.dumps(Evil()))
    marker = json.loads((path / MARKER).read_text())  # a forger also fixes the checksum
    marker["files"][".metadata"] = [(path / ".metadata").stat().st_size,
                                    hashlib.sha256((path / ".metadata").read_bytes()).hexdigest()]
    (path / MARKER).write_text(json.dumps(marker))
    with pytest.raises(CheckpointError, match="builtins.exec"):
        Checkpointer(tmp_path).load(path, state(0))
    assert not pwned.exists()


def test_each_rank_checksums_its_own_files_and_a_share_on_load(tmp_path):
    """2 real ranks: saving, each hashes only the files it wrote (rank 0 also DCP's
    metadata); verifying, the ranks split the files between them; a corrupt file in one
    rank's share fails the check on every rank."""
    out = tmp_path / "out.json"
    torchrun(["tests/dist_checkpoint_shares.py", str(tmp_path / "ckpt"), str(out)])
    got = json.loads(out.read_text())
    r0, r1 = got["ranks"]
    assert got["files"] == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert sorted(r0["save"]) == [".metadata", "__0_0.distcp"] and r1["save"] == ["__1_0.distcp"]
    assert not set(r0["verify"]) & set(r1["verify"])
    assert sorted(r0["verify"] + r1["verify"]) == got["files"]
    assert r0["error"] == r1["error"] and "__1_0.distcp" in r0["error"]
    assert "checksum" in r0["error"]

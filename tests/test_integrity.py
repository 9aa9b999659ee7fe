"""Data that is checked, not trusted: shard checksums and sizes, ids against the manifest,
`dlrm verify`, one writer per dataset, workers that die with their parent."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import SMALL
from helpers import REPO, children, dlrm, mount_tmpfs, quiet, umount

from dlrm.data.loader import PAD_LABEL, ParquetBatches
from dlrm.data.verify import verify_dataset
from dlrm.errors import DataError, PreprocessError
from dlrm.preprocess.driver import preprocess
from dlrm.schema.manifest import load_manifest
from dlrm.schema.splits import resolve_split
from dlrm.synth.criteo import synth
from dlrm.utils.writer_lock import LOCK, writer_lock


@pytest.fixture
def dataset(small_dataset, tmp_path) -> Path:
    """A copy of the session's small dataset, free to damage."""
    return Path(shutil.copytree(small_dataset, tmp_path / "data"))


def _shard(dataset: Path) -> Path:
    return dataset / load_manifest(dataset).sources[0]["files"][0]["path"]


def _read_all(dataset: Path) -> int:
    manifest = load_manifest(dataset)
    batches = ParquetBatches(resolve_split(dataset, manifest, ["*"]), 256, 0, 1, pad=True,
                             prefetch=0, features=manifest.features,
                             cardinalities=manifest.cardinalities)
    return sum(int((b.labels != PAD_LABEL).sum()) for b in batches)


def test_every_flipped_byte_is_refused_naming_the_file(dataset):
    """Of single-bit flips in the middle of a shard, the loader and `verify` refuse every
    one; read without verification (as before), some of them read silently."""
    shard = _shard(dataset)
    original = shard.read_bytes()
    rng = random.Random(0)
    silent_unverified = 0
    for _ in range(40):
        pos = rng.randrange(len(original) // 10, len(original) * 9 // 10)
        flipped = bytearray(original)
        flipped[pos] ^= 1 << rng.randrange(8)
        shard.write_bytes(bytes(flipped))
        with pytest.raises(DataError, match=str(shard)):
            _read_all(dataset)
        assert len(verify_dataset(dataset, load_manifest(dataset), quiet)["bad"]) == 1
        try:
            pq.read_table(shard)  # pyarrow's default: no checksum verification
            silent_unverified += 1
        except Exception:
            pass
    shard.write_bytes(original)
    assert _read_all(dataset) == load_manifest(dataset).rows_accepted
    assert silent_unverified > 0  # the flips are ones a plain read would hand back


def test_a_short_or_missing_shard_is_refused_before_reading(dataset):
    shard = _shard(dataset)
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(DataError, match=rf"{shard}: truncated: {size - 100} bytes, the "
                                        rf"manifest records {size}"):
        _read_all(dataset)
    shard.unlink()
    with pytest.raises(DataError, match=rf"{shard}: missing"):
        _read_all(dataset)


def _edit_manifest(dataset: Path, **changes) -> None:
    path = dataset / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def test_ids_beyond_the_manifests_cardinality_are_refused(dataset):
    manifest = load_manifest(dataset)
    cards = list(manifest.cardinalities)
    f = max(range(len(cards)), key=lambda i: cards[i])
    cards[f] = 3  # ids 0..2 only: the data holds larger ones
    _edit_manifest(dataset, cardinalities=cards)
    name = manifest.schema["sparse"][f]
    with pytest.raises(DataError, match=rf"feature {name} has id \d+ \(row \d+ of the file; "
                                        r"\d+ such ids here\) outside its table of 3"):
        _read_all(dataset)
    report = verify_dataset(dataset, load_manifest(dataset), quiet)
    assert report["bad"] and all(f"feature {name}" in b for b in report["bad"])


def test_verify_command_passes_a_good_dataset_and_names_each_bad_file(dataset):
    ok = dlrm("verify", str(dataset))
    event = json.loads(ok.stdout.strip().splitlines()[-1])
    assert event == {"event": "verify", "dataset": str(dataset), "files": 3,
                     "rows": load_manifest(dataset).rows_accepted, "bad_files": 0}
    manifest = load_manifest(dataset)
    first, last = (dataset / s["files"][0]["path"] for s in manifest.sources[::2])
    with open(first, "r+b") as f:
        f.truncate(1000)
    last.unlink()
    bad = dlrm("verify", str(dataset), check=False)
    assert bad.returncode == 2
    assert f"{first}: truncated" in bad.stderr and f"{last}: missing" in bad.stderr
    assert "2 of 3 files" in bad.stderr


@pytest.mark.parametrize("damage", ["flip", "cardinality"])
def test_training_on_damaged_data_exits_2_naming_it(dataset, tmp_path, damage):
    """The whole chain: a rank's loader thread finds it mid-epoch, `dlrm train` says so
    in one line and exits 2 (it used to train on, exit 0)."""
    manifest = load_manifest(dataset)
    shard = dataset / manifest.sources[1]["files"][0]["path"]  # read once training is on
    if damage == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x10
        shard.write_bytes(bytes(data))
        want = f"{shard}: corrupt"
    else:
        _edit_manifest(dataset, cardinalities=[3] * len(manifest.cardinalities))
        want = "outside its table of 3"
    proc = dlrm("train", *SMALL, f"--data.path={dataset}", "--run-dir", str(tmp_path / "run"),
                check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert want in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_finished_dataset_is_the_same_with_the_lock_file(tmp_path):
    synth(tmp_path / "raw", days=2, rows_per_day=300, seed=3)
    inputs = [tmp_path / "raw" / f"day_{d}" for d in range(2)]
    preprocess(inputs, tmp_path / "a", workers=1, log=quiet)
    assert (tmp_path / "a" / LOCK).read_bytes() == b""  # no holder named once it is done
    assert preprocess(inputs, tmp_path / "a", workers=1, log=quiet)  # a rerun: nothing to do


def test_a_second_writer_is_refused_naming_the_first(tmp_path):
    synth(tmp_path / "raw", days=2, rows_per_day=300, seed=3)
    inputs = [tmp_path / "raw" / f"day_{d}" for d in range(2)]
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path\n"
         "from dlrm.utils.writer_lock import writer_lock\n"
         "with writer_lock(Path(sys.argv[1]), RuntimeError, 'x'):\n"
         "    print('held', flush=True); time.sleep(60)", str(out)],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(PreprocessError, match=rf"{out} is being written by another dlrm "
                                                  rf"preprocess \(pid {holder.pid} on host "):
            preprocess(inputs, out, workers=1, log=quiet)
        assert [p.name for p in out.iterdir()] == [LOCK]  # nothing of the second run's
    finally:
        holder.kill()
        holder.wait()
    # The holder's death released the lock: the dataset can now be written.
    assert preprocess(inputs, out, workers=1, log=quiet).rows_accepted == 600


def test_the_lock_is_held_for_the_block_only(tmp_path):
    with writer_lock(tmp_path, RuntimeError, "x"):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    with writer_lock(tmp_path, RuntimeError, "x"):
        pass


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_workers_die_with_a_killed_preprocess(tmp_path):
    """SIGKILL of the driver alone (not its process group): its workers go too, and a
    rerun finishes the dataset."""
    synth(tmp_path / "raw", days=2, rows_per_day=60_000, seed=3)
    args = ["preprocess", "--input", str(tmp_path / "raw" / "day_0"),
            str(tmp_path / "raw" / "day_1"), "--out", str(tmp_path / "out"), "--workers", "2",
            "--chunk-mb", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "dlrm", *args], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    deadline = time.time() + 60
    while time.time() < deadline and len(workers) < 2:
        workers = {c for c in children(proc.pid)
                   if "multiprocessing" in Path(f"/proc/{c}/cmdline").read_text()}
        time.sleep(0.05)
    assert len(workers) >= 2, "the workers never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.05)
    assert not [w for w in workers if _alive(w)]
    dlrm(*args)
    assert load_manifest(tmp_path / "out").rows_accepted == 120_000


@pytest.fixture
def full_disk(tmp_path):
    """A real 1 MiB file system (tmpfs), to fill."""
    disk = mount_tmpfs(tmp_path / "disk", 1 << 20)
    try:
        yield disk
    finally:
        umount(disk)


def test_a_full_disk_is_named_as_such_with_its_free_bytes(full_disk):
    from dlrm.utils.files import io_fault

    with pytest.raises(OSError) as caught, open(full_disk / "big", "wb") as f:
        for _ in range(4):
            f.write(b"x" * (1 << 19))
            f.flush()
    # A write's error names no file: the directory being written is named.
    assert io_fault(caught.value, full_disk) == (
        f"{full_disk}: disk full (0 bytes free on {full_disk}): No space left on device")
    named = OSError(28, "No space left on device", str(full_disk / "big"))
    assert io_fault(named, full_disk).startswith(f"{full_disk / 'big'}: disk full (")


def test_a_second_training_run_into_one_run_directory_is_refused(small_dataset, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "dlrm", "train", *SMALL, f"--data.path={small_dataset}",
         "--train.epochs=50", "--run-dir", str(run)], cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not ((run / LOCK).exists() and (run / LOCK).read_text()):
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.05)
        second = dlrm("train", *SMALL, f"--data.path={small_dataset}", "--run-dir", str(run),
                      check=False)
        assert second.returncode == 2
        assert (f"dlrm train: error: {run} is being written by another dlrm train "
                f"(pid {first.pid} on host ") in second.stderr
        assert first.poll() is None  # the first run goes on, its checkpoints untouched
    finally:
        first.kill()
        first.wait()


def test_check_ids_finds_negative_and_too_large_ids_and_their_rows():
    from dlrm.schema.integrity import check_ids

    check_ids(np.array([0, 5, 9]), 10, "C1", Path("f"), 0)  # in range: nothing said
    with pytest.raises(DataError, match=r"f: feature C1 has id -8200000000000000000 \(row 101 "
                                        r"of the file; 1 such ids here\) outside its table"):
        check_ids(np.array([3, -8_200_000_000_000_000_000, 4]), 10, "C1", Path("f"), 100)
    with pytest.raises(DataError, match=r"id 10 \(row 7 of the file; 2 such ids"):
        check_ids(np.array([10, 1, 10]), 10, "C1", Path("f"), 7)
    # A bag feature: ids flat, rows by their list offsets (rows 0..2 hold 2, 0, 3 ids).
    with pytest.raises(DataError, match=r"id 12 \(row 52 of the file"):
        check_ids(np.array([1, 2, 3, 12, 4]), 10, "C1", Path("f"), 50, np.array([0, 2, 2, 5]))


def test_a_run_killed_before_its_plan_was_written_is_started_afresh(tmp_path):
    """Killed between taking the lock and writing ``_work/plan.json`` (the fault matrix
    found it: the rerun said the directory was not empty)."""
    synth(tmp_path / "raw", days=2, rows_per_day=300, seed=3)
    inputs = [tmp_path / "raw" / f"day_{d}" for d in range(2)]
    out = tmp_path / "out"
    (out / "_work").mkdir(parents=True)
    (out / LOCK).touch()
    (out / "_work" / f"plan.tmp-{os.getpid() + 1}.json").write_text("{")  # its half-write
    assert preprocess(inputs, out, workers=1, log=quiet).rows_accepted == 600
    assert sorted(p.name for p in out.iterdir()) == [LOCK, "data", "manifest.json",
                                                     "rejects", "vocab.npz"]

"""One rank of the shared-checksum check (run by tests/test_checkpoint.py).

Every rank saves a checkpoint holding a tensor of its own (so each writes its own DCP
file), records which files it checksummed while saving and while verifying, then
verifies a copy whose file written by the last rank is corrupted. Rank 0 writes the
record as JSON.

Usage: torchrun --nproc_per_node N tests/dist_checkpoint_shares.py DIR OUT.json
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import dlrm.train.checkpoint as checkpoint
from dlrm.train.dist import init_distributed


def main(directory: str, out: str) -> None:
    info = init_distributed("cpu")
    hashed: list[str] = []
    sha256 = checkpoint._sha256

    def recording(path: Path) -> str:
        hashed.append(path.name)
        return sha256(path)

    checkpoint._sha256 = recording
    state = {f"rank{info.rank}": torch.full((1000,), float(info.rank))}
    saved = checkpoint.Checkpointer(directory).save(3, state, {"step": 3})
    on_save, hashed[:] = list(hashed), []
    checkpoint.verify_together(saved)
    on_verify, hashed[:] = list(hashed), []

    bad = saved.with_name("corrupt")
    if info.rank == 0:
        shutil.copytree(saved, bad)
        victim = bad / f"__{info.world_size - 1}_0.distcp"
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        victim.write_bytes(bytes(raw))
    dist.barrier()
    try:
        checkpoint.verify_together(bad)
        error = None
    except checkpoint.CheckpointError as e:
        error = str(e)
    records = [None] * info.world_size
    dist.all_gather_object(records, {"save": on_save, "verify": on_verify, "error": error})
    if info.rank == 0:
        marker = json.loads((saved / checkpoint.MARKER).read_text())
        Path(out).write_text(json.dumps({"ranks": records, "files": sorted(marker["files"])}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])

"""One rank of the failed-save check (run by tests/test_checkpoint_faults.py).

Every rank saves into DIR, which rank 0 cannot create (a regular file stands in its
path), so only rank 0 fails; every rank records the CheckpointError it got (or that it
got none), and rank 0 writes them all as JSON. The collective timeout is short, so that
a rank left waiting for rank 0 fails the test instead of hanging it.

Usage: torchrun --nproc_per_node N tests/dist_checkpoint_fails.py DIR OUT.json
"""

from __future__ import annotations

import json
import os
import sys

import torch

from dlrm.errors import CheckpointError
from dlrm.train.checkpoint import Checkpointer
from dlrm.train.dist import gather_object, init_distributed


def main(directory: str, out: str) -> None:
    info = init_distributed("cpu", timeout_s=20)
    state = {f"rank{info.rank}": torch.full((1000,), float(info.rank))}
    try:
        Checkpointer(directory).save(3, state, {"step": 3})
        error = None
    except CheckpointError as e:
        error = str(e)
    errors = gather_object(error)
    if info.is_main:
        with open(out, "w") as f:
            json.dump(errors, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
    # As ``dlrm.cli.entry`` leaves: a gloo thread still alive while the interpreter
    # finalizes can abort a process that has finished ("terminate called without an
    # active exception"); everything this script writes is closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

"""One rank of the preemption agreement's timeout check (run by tests/test_resume_claims.py).

Both ranks make the agreement's group with a 3 s timeout; rank 0 then agrees twice
while rank 1, alive but silent, never joins. Rank 0 writes how long it waited and what it
got to OUT.json; rank 1 leaves once that file exists (or after 60 s).

Usage: torchrun --nproc_per_node 2 tests/dist_preemption_timeout.py OUT.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from dlrm.train.dist import init_distributed
from dlrm.train.preemption import PreemptionFlag


def main(out: str) -> None:
    info = init_distributed("cpu", timeout_s=3)
    flag = PreemptionFlag(3)
    if info.rank == 0:
        start, error = time.perf_counter(), None
        try:
            with flag:
                flag.agreed()
                flag.agreed()  # waits for the first, which rank 1 never joined
        except RuntimeError as e:
            error = str(e)
        Path(out).write_text(json.dumps({"seconds": time.perf_counter() - start,
                                         "error": error}))
    else:
        deadline = time.time() + 60
        while not Path(out).exists() and time.time() < deadline:
            time.sleep(0.1)


if __name__ == "__main__":
    main(*sys.argv[1:])
    # As ``dlrm.cli.entry`` leaves: a gloo thread still alive while the interpreter
    # finalizes can abort a process that has finished ("terminate called without an
    # active exception"); everything this script writes is closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

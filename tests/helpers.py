"""Plain helpers shared by the tests (fixtures stay in each test file or conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from dlrm.data.schema import NUM_DENSE, NUM_SPARSE


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


def quiet(*_: object) -> None:
    """A ``log`` callback that drops the preprocessor's messages."""


REPO = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-5000:]}"
            f"\n--- stderr\n{proc.stderr[-10000:]}"
        )
    return proc


def dlrm(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m dlrm ARGS`` (world size 1 for train); raises with its output on failure."""
    return _run([sys.executable, "-m", "dlrm", *args], timeout)


def torchrun(args: list[str], nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real ``torchrun --standalone --nproc_per_node N ARGS`` (gloo on CPU)."""
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}", *args], timeout)


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

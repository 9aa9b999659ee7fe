"""scripts/torch_build.py: install.sh's decision to install, keep or replace torch, read
from real dist-info and torch/version.py files in fake site-packages directories."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

SCRIPT = REPO / "scripts" / "torch_build.py"


def _site(root: Path, version: str, cuda: str | None) -> Path:
    """A site-packages directory holding torch ``version`` whose version.py says ``cuda``."""
    site = root / "site-packages"
    info = site / f"torch-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
    (info / "RECORD").write_text(f"torch/version.py,,\n{info.name}/METADATA,,\n")
    (site / "torch").mkdir()
    # Written as the wheels write it (an annotated assignment), so the parser must cope.
    (site / "torch" / "version.py").write_text(
        "from typing import Optional\n\n"
        f"__version__ = '{version}'\n"
        "debug = False\n"
        f"cuda: Optional[str] = {cuda!r}\n"
        "hip: Optional[str] = None\n")
    return site


def _decide(want: str, *paths: Path) -> str:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--want", want, *[a for p in paths for a in
                                                        ("--path", str(p))]],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize(("version", "cuda", "on_cpu", "on_cuda"), [
    ("2.13.0+cpu", None, "keep", "reinstall"),
    ("2.13.0+cu128", "12.8", "reinstall", "keep"),
    # PyPI's default Linux wheel: no label, the CUDA build.
    ("2.13.0", "12.8", "reinstall", "keep"),
    # An unlabelled CPU build (macOS wheels, source builds): only version.py tells.
    ("2.13.0", None, "keep", "reinstall"),
    # A build that is neither is replaced for both stacks.
    ("2.13.0+rocm6.3", None, "reinstall", "reinstall"),
])
def test_decision_follows_the_installed_build(tmp_path, version, cuda, on_cpu, on_cuda):
    site = _site(tmp_path, version, cuda)
    assert (_decide("cpu", site), _decide("cuda", site)) == (on_cpu, on_cuda)


def test_the_label_wins_over_version_py(tmp_path):
    # A +cpu wheel is CPU whatever its version.py says: the label is read first.
    site = _site(tmp_path, "2.13.0+cpu", "12.8")
    assert _decide("cpu", site) == "keep"


def test_no_torch_means_install(tmp_path):
    empty = tmp_path / "site-packages"
    (empty / "numpy-2.0.0.dist-info").mkdir(parents=True)  # another package is not torch
    (empty / "numpy-2.0.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: numpy\nVersion: 2.0.0\n")
    assert (_decide("cpu", empty), _decide("cuda", empty)) == ("install", "install")


def test_first_path_is_the_one_import_would_load(tmp_path):
    cpu = _site(tmp_path / "a", "2.13.0+cpu", None)
    cuda = _site(tmp_path / "b", "2.13.0+cu128", "12.8")
    assert _decide("cpu", cpu, cuda) == "keep"
    assert _decide("cpu", cuda, cpu) == "reinstall"


def test_unreadable_version_py_is_replaced(tmp_path):
    site = _site(tmp_path, "2.13.0", None)
    (site / "torch" / "version.py").unlink()
    assert (_decide("cpu", site), _decide("cuda", site)) == ("reinstall", "reinstall")


def test_real_venv_agrees_with_its_torch():
    """This checkout's .venv: the answer matches what its torch says of itself (the CPU
    build here: keep for cpu, reinstall for cuda)."""
    python = REPO / ".venv" / "bin" / "python"
    if not python.exists():
        pytest.skip("no .venv in this checkout (scripts/install.sh builds it)")

    def run(*args: str) -> str:
        return subprocess.run([str(python), *args], cwd=REPO, capture_output=True, text=True,
                              timeout=120, check=True).stdout.strip()

    build = "cpu" if run("-c", "import torch; print(torch.version.cuda)") == "None" else "cuda"
    other = {"cpu": "cuda", "cuda": "cpu"}[build]
    assert run(str(SCRIPT), "--want", build) == "keep"
    assert run(str(SCRIPT), "--want", other) == "reinstall"

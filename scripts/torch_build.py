"""Which build of torch (CPU or CUDA) a virtualenv holds, for ``scripts/install.sh``.

``pip install torch==2.13.0`` is satisfied by an installed ``2.13.0+cpu`` (pip ignores the
local label), so install.sh cannot leave the choice to pip when it switches a venv from one
stack to the other: it asks this script first and uninstalls torch when the build differs.

Stdlib only and torch is never imported: it runs in the venv before torch is installed
(or with the wrong torch installed), and importing torch would cost seconds and may fail.

    python scripts/torch_build.py --want cpu|cuda [--path DIR ...]

prints ``install`` (no torch there), ``keep`` (the wanted build) or ``reinstall``.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Literal

# "other": a build that is neither (ROCm, XPU) or one whose kind cannot be read; it is never
# the wanted one, so install.sh replaces it.
Build = Literal["cpu", "cuda", "other"]


def _cuda_line(version_py: str) -> tuple[bool, object]:
    """(found, value) of the ``cuda = ...`` assignment of a ``torch/version.py``.

    Parsed, not executed: the file belongs to whatever wheel is installed."""
    for node in ast.parse(version_py).body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value  # cuda: Optional[str] = None
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == "cuda" for t in targets):
            try:
                return True, ast.literal_eval(value)
            except ValueError:
                return False, None
    return False, None


def installed_build(paths: Sequence[str] | None = None) -> Build | None:
    """The build of torch installed in ``paths`` (default ``sys.path``); None if none is.

    The local label of the version says it where there is one (``+cpu``, ``+cu128``);
    PyPI's default Linux wheel has none and is the CUDA build, so an unlabelled version is
    read from the ``cuda = ...`` line of the distribution's ``torch/version.py``."""
    search = list(sys.path if paths is None else paths)
    # The first one on the path is the one ``import torch`` would load.
    dist = next(iter(metadata.distributions(name="torch", path=search)), None)
    if dist is None:
        return None
    label = dist.version.partition("+")[2].lower()
    if label == "cpu":
        return "cpu"
    if label.startswith("cu"):
        return "cuda"
    if label:
        return "other"  # rocm6.3, xpu, ...
    try:
        found, cuda = _cuda_line(dist.locate_file("torch/version.py").read_text())
    except (OSError, SyntaxError, UnicodeDecodeError):
        return "other"
    if not found:
        return "other"
    return "cpu" if cuda is None else "cuda"


def decision(want: Literal["cpu", "cuda"], paths: Sequence[str] | None = None) -> str:
    """``install``, ``keep`` or ``reinstall``: what install.sh must do to get ``want``."""
    build = installed_build(paths)
    if build is None:
        return "install"
    return "keep" if build == want else "reinstall"


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: prints the decision for ``--want`` in ``--path`` (default: this sys.path)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--want", choices=["cpu", "cuda"], required=True,
                        help="the build install.sh is installing")
    parser.add_argument("--path", action="append", metavar="DIR",
                        help="a site-packages directory to look in (repeatable)")
    args = parser.parse_args(argv)
    print(decision(args.want, args.path))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``dlrm`` command line: parse, load config, call one function.

One module per group of commands (``data``, ``training``, ``serving``, ``experiments``),
each adding its commands' arguments and handlers; a handler imports what it runs when it
runs, so that ``dlrm --help`` and a bad argument answer without importing torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from dlrm.cli import data, experiments, serving, training


def entry() -> NoReturn:
    """The ``dlrm`` command (and ``python -m dlrm``): :func:`main`, then an exit that skips
    tearing down native thread pools. A pyarrow or gloo thread still alive while the
    interpreter finalizes can abort a run that has finished ("terminate called without
    an active exception", apache/arrow#34314); every file a command writes is closed (and
    renamed into place) before ``main`` returns, so nothing is lost by leaving at once."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dlrm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (data, training, serving, experiments):
        group.add(sub)
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("train", "plan", "sweep"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args, rest)

"""What every command shares: the one way bad input is reported."""

from __future__ import annotations

import sys


def error(command: str, e: Exception) -> int:
    """The one way a command reports bad input: a line naming what is wrong, exit 2."""
    print(f"dlrm {command}: error: {e}", file=sys.stderr)
    return 2


def offline_errors() -> tuple[type[Exception], ...]:
    """The errors of reading a checkpoint, a dataset or a model directory."""
    from dlrm.errors import CheckpointError, ConfigError, PreprocessError

    return (CheckpointError, ConfigError, PreprocessError, ValueError)  # ExportError too

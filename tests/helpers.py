"""Plain helpers shared by the data tests (fixtures stay in each test file)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

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


def quiet(*_: object) -> None:
    """A ``log`` callback that drops the preprocessor's messages."""

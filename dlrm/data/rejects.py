"""Rejected input rows: the reasons, the record of one, and the per-chunk reject files.

A reject file holds ``line<TAB>reason<TAB>text`` per bad row (text cut to
``REJECT_TEXT_BYTES``, newlines escaped); the good rows around a bad one are kept.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlrm.fsutil import atomic_path

if TYPE_CHECKING:
    from dlrm.data.blocks import Block

REJECT_REASONS = ("line_too_long", "truncated_gzip", "empty_line", "invalid_utf8",
                  "wrong_field_count", "bad_label", "bad_dense", "bad_categorical",
                  "list_too_long", "bad_time")
REJECT_TEXT_BYTES = 1000  # rejects keep at most this much of a bad line


@dataclass
class Reject:
    line: int  # 1-based within the chunk until the final merge makes it file-wide
    reason: str
    text: bytes


def with_rejects(blocks: Iterator[Block], path: Path, summary: dict[str, Any]) -> Iterator[Block]:
    """Passes ``blocks`` through, writing their rejects to ``path`` (atomically, once all
    are read); then fills ``summary`` with ``lines``, ``rejected_by_reason`` and, with side
    tables, ``unmatched`` (per table, the rows whose key it lacks)."""
    reasons: Counter[str] = Counter()
    lines, unmatched = 0, None
    with atomic_path(path) as tmp, open(tmp, "wb") as rejects:
        for block in blocks:
            lines = block.lines
            if block.unmatched is not None:
                unmatched = [a + b for a, b in zip(unmatched or [0] * len(block.unmatched),
                                                   block.unmatched, strict=True)]
            for r in block.rejects:
                reasons[r.reason] += 1
                rejects.write(b"%d\t%s\t%s\n" % (r.line, r.reason.encode(), one_line(r.text)))
            yield block
    summary.update(lines=lines, rejected_by_reason=dict(sorted(reasons.items())),
                   **({"unmatched": unmatched} if unmatched is not None else {}))


def one_line(text: bytes) -> bytes:
    return text.replace(b"\n", b"\\n").replace(b"\r", b"\\r")

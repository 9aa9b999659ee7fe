"""Rejected input rows: the reasons, the record of one, how its text is written.

A reject file (``blocks.with_rejects`` writes a chunk's) holds ``line<TAB>reason<TAB>text``
per bad row (text cut to ``REJECT_TEXT_BYTES``, newlines escaped); the good rows around a
bad one are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

REJECT_REASONS = ("line_too_long", "truncated_gzip", "empty_line", "invalid_utf8",
                  "wrong_field_count", "bad_label", "bad_dense", "bad_categorical",
                  "list_too_long", "bad_time")
REJECT_TEXT_BYTES = 1000  # rejects keep at most this much of a bad line


@dataclass
class Reject:
    line: int  # 1-based within the chunk until the final merge makes it file-wide
    reason: str
    text: bytes


def one_line(text: bytes) -> bytes:
    return text.replace(b"\n", b"\\n").replace(b"\r", b"\\r")

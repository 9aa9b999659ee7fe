"""Input files cut into chunks, and the whole lines of a chunk read a block at a time.

A chunk is a byte range of a plain file (it owns the lines that start inside the range)
or a whole gzip file (a stream cannot be entered in the middle). Lines longer than
``max_line_bytes`` and a gzip stream cut short become rejects; nothing else is judged here.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from dlrm.rows.rejects import REJECT_TEXT_BYTES, Reject


@dataclass(frozen=True)
class Options:
    """How the work is cut; none of these change the dataset's content."""

    workers: int = 0  # processes; 0: all cores
    chunk_bytes: int = 256 << 20  # plain files are cut into byte ranges of this size
    block_bytes: int = 16 << 20  # each chunk is read this much at a time
    max_line_bytes: int = 64 << 10  # longer lines are rejected (Criteo lines are < 1 KiB)
    stage: bool = True  # vocab: stage parsed rows for the second pass (if the disk has room)
    memory_gib: float = 0  # vocab: counting and merging's budget; 0: a quarter of the host's


def source_name(path: Path) -> str:
    """``/x/day_3.gz`` → ``day_3``; ``train.txt`` → ``train``."""
    name = path.name
    for suffix in (".gz", ".tsv", ".txt", ".csv", ".parquet"):
        name = name.removesuffix(suffix)
    return name


@dataclass(frozen=True)
class Task:
    """One chunk of one source."""

    source: str
    path: str
    index: int  # chunk number within the source
    start: int  # byte range of the file (plain) or 0, -1 (gzip: the whole stream)
    end: int

    @property
    def key(self) -> str:
        return f"{self.source}-{self.index:05d}"

    @property
    def gzip(self) -> bool:
        return self.end < 0

    @property
    def bytes(self) -> int:
        """Input bytes of the chunk (gzip: of the compressed file)."""
        return Path(self.path).stat().st_size if self.gzip else self.end - self.start


def plan_tasks(paths: list[Path], chunk_bytes: int, whole: bool = False) -> list[Task]:
    """The chunks of ``paths``: byte ranges of plain files; a gzip file whole, and every
    file with ``whole`` (Parquet)."""
    tasks = []
    for p in paths:
        name, size = source_name(p), p.stat().st_size
        if whole or p.suffix == ".gz":
            tasks.append(Task(name, str(p), 0, 0, -1))
            continue
        n = max(1, -(-size // chunk_bytes))
        tasks += [Task(name, str(p), i, i * chunk_bytes, min((i + 1) * chunk_bytes, size))
                  for i in range(n)]
    return tasks


class LineReader:
    """Complete lines of one chunk, a block at a time, with overlong lines cut out.

    A chunk of a plain file owns the lines that start in ``[start, end)``; the gzip
    chunk owns the whole stream. A truncated or corrupt gzip stream ends the chunk with
    a ``truncated_gzip`` reject at the line where the data stops; lines before it stay.
    """

    def __init__(self, task: Task, opts: Options, progress: Callable[[int], None]):
        self.task, self.opts, self.progress = task, opts, progress
        self.lines = 0  # lines consumed so far (the next line is number lines + 1)
        self.rejects: list[Reject] = []

    def _open(self) -> tuple[BinaryIO | GzipStream, int]:
        if self.task.gzip:
            return GzipStream(self.task.path), -1
        f = open(self.task.path, "rb")
        if self.task.start > 0:
            f.seek(self.task.start - 1)
            if f.read(1) != b"\n":  # the line in progress belongs to the previous chunk
                while True:
                    piece = f.readline(1 << 20)
                    if not piece or piece.endswith(b"\n"):
                        break
        return f, self.task.end

    def blocks(self) -> Iterator[bytes]:
        """Yields buffers of whole lines (each ending in a newline).

        Reports the input bytes it reads to ``progress``, the chunk's own share in all
        (``Task.bytes``): a read past ``end`` (the last line, a block overshooting) is not
        counted again by the next chunk's bar.
        """
        budget, reported = self.task.bytes, 0

        def report(n: int) -> None:
            nonlocal reported
            n = min(n, budget - reported)
            if n > 0:
                self.progress(n)
                reported += n

        try:
            yield from self._blocks(report)
        finally:
            report(budget - reported)

    def _blocks(self, report: Callable[[int], None]) -> Iterator[bytes]:
        f, end = self._open()
        with f:
            pos = f.tell()  # offset (plain file) of the first byte of ``carry``
            carry, skipping = b"", False
            while end < 0 or pos < end:  # past ``end``, lines start in the next chunk
                data = f.read(self.opts.block_bytes)
                report(f.raw_read_delta() if self.task.gzip else len(data))
                if not data:
                    if self.task.gzip and f.truncated:
                        self._reject("truncated_gzip", carry or b"<gzip stream cut short>")
                    elif carry and not skipping:  # a last line without its newline
                        yield from self._cut(carry + b"\n", pos, end)
                    return
                if skipping:  # the rest of an overlong line, already rejected
                    nl = data.find(b"\n")
                    pos += len(data) if nl < 0 else nl + 1
                    if nl < 0:
                        continue
                    data, skipping = data[nl + 1:], False
                buf = carry + data
                last = buf.rfind(b"\n")
                if last < 0:
                    carry = buf
                    if len(carry) > self.opts.max_line_bytes:
                        self._reject("line_too_long", carry)
                        pos, carry, skipping = pos + len(carry), b"", True
                    continue
                complete, carry = buf[:last + 1], buf[last + 1:]
                yield from self._cut(complete, pos, end)
                pos += len(complete)

    def _cut(self, complete: bytes, pos: int, end: int) -> Iterator[bytes]:
        """Drops the lines that start at or after ``end`` (they are the next chunk's)."""
        if end >= 0 and pos + len(complete) > end:
            arr = np.frombuffer(complete, np.uint8)
            starts = np.r_[0, np.flatnonzero(arr == 10)[:-1] + 1]
            owned = int(np.count_nonzero(pos + starts < end))
            if owned < starts.size:
                complete = complete[: starts[owned]]
        if complete:
            yield complete

    def _reject(self, reason: str, text: bytes) -> None:
        self.lines += 1
        self.rejects.append(Reject(self.lines, reason, text[:REJECT_TEXT_BYTES]))


class GzipStream:
    """Decompresses gzip members one after another.

    Unlike ``gzip.open``, a stream cut short or corrupt does not lose the block being
    read: every byte that could be decoded is returned, then ``read`` returns b"" with
    ``truncated`` set.
    """

    def __init__(self, path: str) -> None:
        self.f = open(path, "rb")
        self.d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self.pending = b""
        self.in_member = self.truncated = self.done = False
        self.raw_read = self.raw_reported = 0

    def __enter__(self) -> GzipStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()

    def tell(self) -> int:
        return 0

    def raw_read_delta(self) -> int:
        delta, self.raw_reported = self.raw_read - self.raw_reported, self.raw_read
        return delta

    def read(self, n: int) -> bytes:
        out, size = [self.pending], len(self.pending)
        while size < n and not self.done:
            raw = self.f.read(1 << 20)
            self.raw_read += len(raw)
            if not raw:
                self.truncated, self.done = self.in_member, True
                break
            try:
                data = self._feed(raw)
            except zlib.error:
                self.truncated = self.done = True
                break
            out.append(data)
            size += len(data)
        buf = b"".join(out)
        self.pending = buf[n:]
        return buf[:n]

    def _feed(self, raw: bytes) -> bytes:
        parts = []
        while raw:
            self.in_member = True
            parts.append(self.d.decompress(raw))
            raw = b""
            if self.d.eof:  # next member, if any
                raw = self.d.unused_data
                self.d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                self.in_member = False
        return b"".join(parts)

"""Criteo TSV / TSV.gz → Parquet shards + manifest.json: parallel, streaming, resumable.

Work is cut into *chunks*: byte ranges of plain files (a chunk owns the lines that start
inside its range), whole files for gzip (a stream cannot be entered in the middle).
``workers`` processes take chunks from a queue. Each chunk is read in blocks of
``block_bytes`` and never held whole, so a worker's memory is a few blocks plus, for the
vocab pass, the distinct values its chunk has seen: bounded by block size and vocabulary,
not by file size.

Each block's fields are split by pyarrow's CSV reader (as raw bytes) and then checked
and converted by whole-array numpy operations on each column's bytes: no Python per row.

1. ``vocab`` encoding only: every chunk is validated and transformed, its parsed rows
   staged (Arrow IPC, LZ4) and each categorical value counted per feature; the counts of
   all chunks are merged exactly; each feature's vocabulary is the values seen at least
   ``min_frequency`` times, by descending count (ties by value), capped at ``max_vocab``,
   and is turned into a hash table.
2. Every chunk is written as Parquet shards: ``hash`` validates and transforms it here,
   ``vocab`` reads its staged rows back and looks the ids up in the hash tables.

Dense features: missing → 0, negative → 0, then ``log1p``, stored as float32 (done once
here, so training and evaluation read the same numbers). Categorical features: hex →
uint64 → id, integers all the way (int64 in Parquet); ids follow ``schema.MISSING_ID`` /
``schema.OOV_ID``. Bad rows are counted by reason and written to ``rejects/<source>.tsv``
as ``line<TAB>reason<TAB>text``; the good rows around them are kept.

Resumable: a chunk's outputs are final once its done record is written (last, by atomic
rename), and a rerun skips chunks that have one, so killing the process at any moment
and rerunning the same command gives the same dataset. ``manifest.json`` is written last,
atomically: a dataset is complete iff it exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from dlrm.data.schema import DENSE_NAMES, LABEL, MISSING_ID, OOV_ID, SPARSE_NAMES, TSV_COLUMNS
from dlrm.fsutil import atomic_path, atomic_write_json
from dlrm.heap import keep_freed_memory

MANIFEST = "manifest.json"
FORMAT = "dlrm-criteo-parquet/1"
WORK = "_work"  # in-progress state; removed once the manifest is written
ROW_GROUP_ROWS = 1 << 16
SHARD_ROWS = 1 << 20
REJECT_REASONS = ("line_too_long", "truncated_gzip", "empty_line", "invalid_utf8",
                  "wrong_field_count", "bad_label", "bad_dense", "bad_categorical")
_REJECT_TEXT_BYTES = 1000  # rejects keep at most this much of a bad line


class PreprocessError(RuntimeError):
    """A fatal condition (missing input, unusable output, full disk); names the path."""


@dataclass(frozen=True)
class Encoding:
    """How categorical values become ids; recorded in the manifest."""

    type: str = "vocab"  # "vocab" or "hash"
    min_frequency: int = 1  # vocab: values seen fewer times map to OOV_ID
    max_vocab: int = 0  # vocab: keep at most this many values per feature; 0: no cap
    buckets: int = 40_000_000  # hash: ids are 1 + value % (buckets - 1); 0 is missing

    def to_json(self) -> dict[str, Any]:
        if self.type == "hash":
            return {"type": "hash", "buckets": self.buckets}
        return {"type": "vocab", "min_frequency": self.min_frequency, "max_vocab": self.max_vocab}


@dataclass(frozen=True)
class Options:
    """How the work is cut; none of these change the dataset's content."""

    workers: int = 0  # processes; 0: all cores
    chunk_bytes: int = 256 << 20  # plain files are cut into byte ranges of this size
    block_bytes: int = 16 << 20  # each chunk is read this much at a time
    max_line_bytes: int = 64 << 10  # longer lines are rejected (Criteo lines are < 1 KiB)


def source_name(path: Path) -> str:
    """``/x/day_3.gz`` → ``day_3``; ``train.txt`` → ``train``."""
    name = path.name
    for suffix in (".gz", ".tsv", ".txt", ".csv"):
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


def _plan_tasks(paths: list[Path], chunk_bytes: int) -> list[Task]:
    tasks = []
    for p in paths:
        name, size = source_name(p), p.stat().st_size
        if p.suffix == ".gz":
            tasks.append(Task(name, str(p), 0, 0, -1))
            continue
        n = max(1, -(-size // chunk_bytes))
        tasks += [Task(name, str(p), i, i * chunk_bytes, min((i + 1) * chunk_bytes, size))
                  for i in range(n)]
    return tasks


# --------------------------------------------------------------------------- reading


@dataclass
class Reject:
    line: int  # 1-based within the chunk until the final merge makes it file-wide
    reason: str
    text: bytes


Hex = list[tuple[np.ndarray, np.ndarray]]  # per categorical feature: (uint64 values, present)


@dataclass
class Block:
    """Good rows of one block, parsed and transformed, and the block's rejects."""

    label: np.ndarray  # int8
    dense: list[np.ndarray]  # per dense feature: float32, transformed
    hex: Hex
    rejects: list[Reject]
    lines: int  # lines of the chunk consumed up to the end of this block

    @classmethod
    def empty(cls, rejects: list[Reject], lines: int) -> Block:
        hex_ = [(np.zeros(0, np.uint64), np.zeros(0, bool)) for _ in SPARSE_NAMES]
        dense = [np.zeros(0, np.float32) for _ in DENSE_NAMES]
        return cls(np.zeros(0, np.int8), dense, hex_, rejects, lines)


class _LineReader:
    """Complete lines of one chunk, a block at a time, with overlong lines cut out.

    A chunk of a plain file owns the lines that start in ``[start, end)``; the gzip
    chunk owns the whole stream. A truncated or corrupt gzip stream ends the chunk with
    a ``truncated_gzip`` reject at the line where the data stops; lines before it stay.
    """

    def __init__(self, task: Task, opts: Options, progress: Callable[[int], None]):
        self.task, self.opts, self.progress = task, opts, progress
        self.lines = 0  # lines consumed so far (the next line is number lines + 1)
        self.rejects: list[Reject] = []

    def _open(self) -> tuple[BinaryIO | _GzipStream, int]:
        if self.task.gzip:
            return _GzipStream(self.task.path), -1
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
        self.rejects.append(Reject(self.lines, reason, text[:_REJECT_TEXT_BYTES]))


class _GzipStream:
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

    def __enter__(self) -> _GzipStream:
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


def _read_blocks(task: Task, opts: Options,
                 progress: Callable[[int], None] = lambda n: None) -> Iterator[Block]:
    """Parsed blocks of a chunk; the last one carries the reader's own rejects."""
    reader = _LineReader(task, opts, progress)
    for buf in reader.blocks():
        first_line = reader.lines + 1
        arr = np.frombuffer(buf, np.uint8)
        ends = np.flatnonzero(arr == 10)
        starts = np.r_[0, ends[:-1] + 1]
        reader.lines += ends.size
        rejects = reader.rejects
        reader.rejects = []
        lengths = ends - starts
        blank = lengths == 0
        long = lengths > opts.max_line_bytes
        bad_utf8 = np.zeros(ends.size, bool)
        non_ascii = np.zeros(0, np.int64) if buf.isascii() else np.flatnonzero(arr >= 0x80)
        for i in np.unique(np.searchsorted(ends, non_ascii)):
            try:  # Criteo is ASCII: only lines holding other bytes need a look
                buf[starts[i]:ends[i]].decode("utf-8")
            except UnicodeDecodeError:
                bad_utf8[i] = True
        keep = ~(blank | long | bad_utf8)
        for i in np.flatnonzero(~keep):
            reason = "line_too_long" if long[i] else "empty_line" if blank[i] else "invalid_utf8"
            text = buf[starts[i]:min(ends[i], starts[i] + _REJECT_TEXT_BYTES)]
            rejects.append(Reject(first_line + int(i), reason, text))
        kept = np.flatnonzero(keep)
        if kept.size < ends.size:
            buf = b"".join(buf[starts[i]:ends[i] + 1] for i in kept)
        if kept.size:
            block = _parse(buf, first_line + kept)
            block.rejects = sorted(rejects + block.rejects, key=lambda r: r.line)
            block.lines = reader.lines
            yield block
        else:
            yield Block.empty(rejects, reader.lines)
    if reader.rejects:
        yield Block.empty(reader.rejects, reader.lines)


def _parse(buf: bytes, line_of: np.ndarray) -> Block:
    """Splits, checks and converts the fields of ``buf`` (whole lines); rows with problems
    become rejects. ``line_of[k]`` is the line number of the k-th line of ``buf``.

    pyarrow's CSV reader splits the fields (as raw bytes); each column is then checked
    and converted with whole-array numpy operations on the column's bytes and offsets.
    """
    wrong: list[int] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        wrong.append(row.number)
        return "skip"

    table = pacsv.read_csv(
        pa.py_buffer(buf),
        read_options=pacsv.ReadOptions(column_names=TSV_COLUMNS, use_threads=False,
                                       block_size=len(buf) + 1),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False,
                                         ignore_empty_lines=False, invalid_row_handler=on_invalid),
        convert_options=pacsv.ConvertOptions(column_types={c: pa.binary() for c in TSV_COLUMNS}),
    )
    rejects = []
    valid_lines = line_of
    if wrong:
        rows = np.asarray(wrong, dtype=np.int64) - 1  # pyarrow numbers physical rows from 1
        mask = np.ones(line_of.size, bool)
        mask[rows] = False
        lines = buf.split(b"\n")
        rejects += [Reject(int(line_of[r]), "wrong_field_count", lines[r][:_REJECT_TEXT_BYTES])
                    for r in rows]
        valid_lines = line_of[mask]

    reason = np.full(table.num_rows, -1, dtype=np.int64)  # first problem of each row

    def mark(ok: np.ndarray, why: str) -> None:
        reason[(reason < 0) & ~ok] = REJECT_REASONS.index(why)

    label, ok = _label(*_raw(table.column(LABEL)))
    mark(ok, "bad_label")
    dense = []
    for c in DENSE_NAMES:
        x, ok = _dense(table.column(c))
        mark(ok, "bad_dense")
        dense.append(x)
    hex_ = []
    for c in SPARSE_NAMES:
        values, present, ok = _hex_values(*_raw(table.column(c)))
        mark(ok, "bad_categorical")
        hex_.append((values, present))

    bad = np.flatnonzero(reason >= 0)
    if bad.size:
        texts = _join_fields(table.take(bad))
        for i, text in zip(bad, texts, strict=True):
            why = REJECT_REASONS[int(reason[i])]
            rejects.append(Reject(int(valid_lines[i]), why, text[:_REJECT_TEXT_BYTES]))
        good = reason < 0
        label, dense = label[good], [x[good] for x in dense]
        hex_ = [(v[good], p[good]) for v, p in hex_]
    return Block(label, dense, hex_, rejects, 0)


def _join_fields(table: pa.Table) -> list[bytes]:
    cols = [table.column(c).to_pylist() for c in TSV_COLUMNS]
    return [b"\t".join(fields) for fields in zip(*cols, strict=True)]


def _array(column: pa.ChunkedArray) -> pa.Array:
    if column.num_chunks == 1:
        return column.chunk(0)
    return column.combine_chunks() if column.num_chunks else pa.array([], column.type)


def _raw(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A binary column's value offsets (n + 1 of them, from 0) and its bytes."""
    arr = _array(column)
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset: arr.offset + n + 1]
    data = arr.buffers()[2]
    data = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    if n == 0:
        return np.zeros(1, np.int64), data[:0]
    return (offsets - offsets[0]).astype(np.int64), data[offsets[0]:offsets[-1]]


def _label(offsets: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label fields → (int8 labels, valid): exactly "0" or "1"."""
    first = data[np.minimum(offsets[:-1], data.size - 1)] if data.size else offsets[:-1] * 0
    one = first == ord("1")
    ok = (np.diff(offsets) == 1) & (one | (first == ord("0")))
    return (one & ok).astype(np.int8), ok


_LOG1P = np.log1p(np.arange(1 << 16, dtype=np.float64)).astype(np.float32)  # small values


def _dense(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Integer fields → (transformed float32, valid).

    Valid: empty (missing), or an optional ``-`` and 1 to 18 decimal digits. Missing and
    negative values become 0, then ``log1p`` (in float64, then rounded to float32). Only
    the valid non-negative fields are handed to pyarrow's integer parser, so it never
    sees anything else it would accept (such as ``0x10``).
    """
    offsets, data = _raw(column)
    lengths = np.diff(offsets)
    ok = np.ones(lengths.size, bool)
    neg = np.zeros(lengths.size, bool)
    odd = np.flatnonzero((data - np.uint8(ord("0"))) > 9)  # bytes that are not digits
    if odd.size:
        row = np.searchsorted(offsets, odd, side="right") - 1
        sign = (data[odd] == ord("-")) & (odd == offsets[row])  # a leading minus
        ok[row[~sign]] = False
        neg[row[sign]] = True
    ok &= (lengths - neg <= 18) & ~(neg & (lengths == 1))
    parse = ok & ~neg & (lengths > 0)
    out = np.zeros(lengths.size, np.float32)
    if parse.any():
        text = pc.cast(_array(column), pa.string())
        x = pc.cast(pc.if_else(pa.array(parse), text, None), pa.int64()).fill_null(0).to_numpy()
        small = x < _LOG1P.size
        out[small] = _LOG1P[x[small]]
        out[~small] = np.log1p(x[~small].astype(np.float64)).astype(np.float32)
    return out, ok


_HEX = np.full(256, 255, np.uint8)  # byte → hex digit value, 255: not a hex digit
for _i, _ch in enumerate(b"0123456789abcdef"):
    _HEX[_ch] = _i
    _HEX[bytes([_ch]).upper()[0]] = _i


def _u64(x: int) -> np.uint64:
    return np.uint64(x)


_BYTES = {b: _u64(int.from_bytes(bytes([b]) * 8, "little"))  # the byte in all 8 places
          for b in (0x01, 0x0F, 0x30, 0x76, 0x7F, 0x80)}


def _hex8(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fields of exactly 8 characters, one little-endian uint64 each → (their values as
    hex numbers, valid), with whole-word arithmetic on the 8 bytes at once.

    A byte c becomes the digit ``(c & 0xF) + 9 * bit 6 of c`` (right for 0-9, a-f, A-F);
    it was a hex digit iff that digit is below 16 and spells c back in lower or upper
    case. No step carries from one byte into the next.
    """
    b = _BYTES
    nib = (words & b[0x0F]) + ((words >> _u64(6)) & b[0x01]) * _u64(9)
    letter = ((nib + b[0x76]) & b[0x80]) >> _u64(7)  # 1 in the bytes whose digit is > 9
    lower = nib + b[0x30] + letter * _u64(0x27)
    upper = nib + b[0x30] + letter * _u64(0x07)

    def nonzero_bytes(x: np.ndarray) -> np.ndarray:  # 0x80 in each byte of x that is not 0
        return (((x & b[0x7F]) + b[0x7F]) | x) & b[0x80]

    bad = (nonzero_bytes(words ^ lower) & nonzero_bytes(words ^ upper)) | (nib & ~b[0x0F])
    # Gather the digits: pairs into bytes, bytes into 16-bit halves, halves into 32 bits.
    # The first character is the lowest byte and the most significant digit.
    m = _u64(0x000F000F000F000F)
    x = ((nib & m) << _u64(4)) | ((nib >> _u64(8)) & m)
    m = _u64(0x000000FF000000FF)
    x = ((x & m) << _u64(8)) | ((x >> _u64(16)) & m)
    m = _u64(0xFFFF)
    return ((x & m) << _u64(16)) | ((x >> _u64(32)) & m), bad == 0


def _hex_values(offsets: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                np.ndarray]:
    """Hex fields → (uint64 values, present, valid), vectorised over the raw bytes.

    Empty is "missing" (present False, valid True); more than 16 digits or a non-hex
    byte is invalid. Criteo's fields all have 8 digits or none: their bytes then lie
    back to back, 8 to a field, and are converted as one uint64 each (``_hex8``). Other lengths
    take a general path: each field's digits are gathered into a 16-digit window,
    right-aligned, and packed two digits a byte.
    """
    n = offsets.size - 1
    lengths = np.diff(offsets)
    present = lengths > 0
    values = np.zeros(n, np.uint64)
    valid = np.ones(n, bool)
    if data.size == 8 * np.count_nonzero(present) and (n == 0 or lengths.max() <= 8):
        values[present], valid[present] = _hex8(data.view("<u8"))
    else:
        pad = np.zeros(16, np.uint8)
        data = np.concatenate([pad, data, pad])
        ends = offsets[1:] + 16
        digits = _HEX[data[ends[:, None] - 16 + np.arange(16)]]
        digits[np.arange(16) < 16 - np.minimum(lengths, 16)[:, None]] = 0
        valid = (lengths <= 16) & ~np.any(digits == 255, axis=1)
        digits[~valid] = 0
        packed = np.ascontiguousarray((digits[:, 0::2] << 4) | digits[:, 1::2])
        values = packed.view(">u8").ravel().astype(np.uint64)
    values[~valid] = 0
    return values, present, valid


# --------------------------------------------------------------------------- rejects


def _with_rejects(blocks: Iterator[Block], path: Path, summary: dict[str, Any]) -> Iterator[Block]:
    """Passes ``blocks`` through, writing their rejects to ``path`` (atomically, once all
    are read); then fills ``summary`` with ``lines`` and ``rejected_by_reason``."""
    reasons: Counter[str] = Counter()
    lines = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as rejects:
        for block in blocks:
            lines = block.lines
            for r in block.rejects:
                reasons[r.reason] += 1
                rejects.write(b"%d\t%s\t%s\n" % (r.line, r.reason.encode(), _one_line(r.text)))
            yield block
    summary.update(lines=lines, rejected_by_reason=dict(sorted(reasons.items())))


def _one_line(text: bytes) -> bytes:
    return text.replace(b"\n", b"\\n").replace(b"\r", b"\\r")


# --------------------------------------------------------------------------- vocab pass 1

# Between its two passes the vocab encoding keeps each chunk's parsed rows in an Arrow IPC
# file (LZ4, about 40% of the TSV's size): the second pass then reads them back instead of
# parsing the TSV again. Raw categorical values are uint64; which are present is a bitmask.
STAGED_SCHEMA = pa.schema(
    [(LABEL, pa.int8())]
    + [(c, pa.float32()) for c in DENSE_NAMES]
    + [(c, pa.uint64()) for c in SPARSE_NAMES]
    + [("present", pa.uint32())]  # bit f: feature f has a value
)
_IPC = pa.ipc.IpcWriteOptions(compression="lz4")


def _staged(work: Path, task: Task) -> tuple[Path, Path]:
    """The chunk's staged rows and its summary (lines read, rejects by reason)."""
    return work / "staged" / f"{task.key}.arrow", work / "staged" / f"{task.key}.json"


def _stage_batch(block: Block) -> pa.RecordBatch:
    present = np.zeros(block.label.size, np.uint32)
    for f, (_, p) in enumerate(block.hex):
        present |= p.astype(np.uint32) << np.uint32(f)
    arrays = [pa.array(block.label)] + [pa.array(x) for x in block.dense]
    arrays += [pa.array(v) for v, _ in block.hex] + [pa.array(present)]
    return pa.RecordBatch.from_arrays(arrays, schema=STAGED_SCHEMA)


def _read_staged(path: Path) -> Iterator[Block]:
    with pa.memory_map(str(path)) as source, pa.ipc.open_file(source) as reader:
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            cols = [c.to_numpy() for c in batch.columns]
            present = cols[-1]
            hex_ = [(cols[1 + len(DENSE_NAMES) + f], (present >> np.uint32(f)) & 1 == 1)
                    for f in range(len(SPARSE_NAMES))]
            yield Block(cols[0], cols[1:1 + len(DENSE_NAMES)], hex_, [], 0)


def _compact(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Merges (values, counts) pairs into one, summing the counts of equal values."""
    if not parts:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    values = np.concatenate([v for v, _ in parts])
    counts = np.concatenate([c for _, c in parts])
    uniq, inverse = np.unique(values, return_inverse=True)
    return uniq, np.bincount(inverse, weights=counts, minlength=uniq.size).astype(np.int64)


def _count_chunk(task: Task, opts: Options, work: str, progress: Any) -> None:
    """Pass 1 for one chunk: its rejects, its staged rows, its summary, and last (the mark
    that the chunk's pass 1 is complete) its per-feature value counts."""
    work_dir = Path(work)
    staged, summary_path = _staged(work_dir, task)
    parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in SPARSE_NAMES]
    summary: dict[str, Any] = {}
    report = _Progress(progress)
    blocks = _read_blocks(task, opts, report)
    with atomic_path(staged) as tmp, \
            pa.ipc.new_file(str(tmp), STAGED_SCHEMA, options=_IPC) as writer:
        for block in _with_rejects(blocks, work_dir / "rejects" / f"{task.key}.tsv", summary):
            writer.write_batch(_stage_batch(block))
            for f, (values, present) in enumerate(block.hex):
                parts[f].append(np.unique(values[present], return_counts=True))
                if len(parts[f]) >= 16:  # keep memory at the chunk's distinct values
                    parts[f] = [_compact(parts[f])]
    atomic_write_json(summary_path, summary)
    merged = [_compact(p) for p in parts]
    arrays = {f"{c}_values": v for c, (v, _) in zip(SPARSE_NAMES, merged, strict=True)}
    arrays |= {f"{c}_counts": n for c, (_, n) in zip(SPARSE_NAMES, merged, strict=True)}
    _atomic_npz(work_dir / "counts" / f"{task.key}.npz", arrays)
    report.flush()


def build_vocab(counts: tuple[np.ndarray, np.ndarray], enc: Encoding) -> np.ndarray:
    """Vocabulary of one feature: values in id order (id = position + 2)."""
    values, n = counts
    keep = n >= enc.min_frequency
    values, n = values[keep], n[keep]
    order = np.lexsort((values, -n))  # descending count, then ascending value
    if enc.max_vocab:
        order = order[: enc.max_vocab]
    return values[order]


# --------------------------------------------------------------------------- pass 2


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio: multiplicative hashing


def _slots(values: np.ndarray, bits: int) -> np.ndarray:
    return ((values * _GOLDEN) >> np.uint64(64 - bits)).astype(np.int64)


def _hash_table(vocab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A vocabulary as an open-addressing hash table with linear probing: (keys, ids),
    ``2**bits >= 2 * len(vocab)`` slots, id -1 where a slot is empty.

    Built in rounds: every value not yet placed tries its next slot; of those that find
    the slot empty, the first (in vocabulary order) takes it. A value thus sits after an
    unbroken run of full slots from its home slot, which is what a probe relies on.
    """
    bits = max(4, (2 * vocab.size - 1).bit_length())
    keys = np.zeros(1 << bits, np.uint64)
    ids = np.full(1 << bits, -1, np.int32)
    pending = np.arange(vocab.size)
    slot = _slots(vocab, bits)
    while pending.size:
        free = np.flatnonzero(ids[slot] < 0)
        taken, first = np.unique(slot[free], return_index=True)
        won = free[first]
        ids[taken] = pending[won] + 2
        keys[taken] = vocab[pending[won]]
        lost = np.ones(pending.size, bool)
        lost[won] = False
        pending, slot = pending[lost], (slot[lost] + 1) & ((1 << bits) - 1)
    return keys, ids


def _probe(keys: np.ndarray, ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The id of each value in the table, OOV_ID for those it does not hold."""
    mask = keys.size - 1
    slot = _slots(values, mask.bit_length())
    found = ids[slot]
    full = found >= 0
    hit = full & (keys[slot] == values)
    out = np.where(hit, found, OOV_ID).astype(np.int64)
    todo = np.flatnonzero(full & ~hit)  # a slot holding another value: try the next
    slot = slot[todo]
    while todo.size:
        slot = (slot + 1) & mask
        found = ids[slot]
        full = found >= 0
        hit = full & (keys[slot] == values[todo])
        out[todo[hit]] = found[hit]
        more = full & ~hit
        todo, slot = todo[more], slot[more]
    return out


class _Encoder:
    """Categorical values → ids: by the hash rule, or (``tables``: the directory that
    ``_save_tables`` wrote) by each feature's vocabulary. Pickled into every task without
    the tables; each process maps them from disk when it first needs them."""

    def __init__(self, enc: Encoding, tables: str | None = None):
        self.enc, self.tables = enc, tables
        self._loaded: list[tuple[np.ndarray, np.ndarray]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_loaded": None}

    def ids(self, f: int, values: np.ndarray, present: np.ndarray) -> np.ndarray:
        if self.tables is None:
            ids = (values % np.uint64(self.enc.buckets - 1)).astype(np.int64) + 1
        else:
            if self._loaded is None:
                def load(name: str) -> np.ndarray:  # mapped, as a plain array (faster)
                    return np.asarray(np.load(Path(self.tables) / name, mmap_mode="r"))

                self._loaded = [(load(f"{c}.keys.npy"), load(f"{c}.ids.npy"))
                                for c in SPARSE_NAMES]
            ids = _probe(*self._loaded[f], values)
        return np.where(present, ids, MISSING_ID)


def _save_tables(vocabs: list[np.ndarray], tables: Path) -> None:
    tables.mkdir(parents=True, exist_ok=True)
    for c, vocab in zip(SPARSE_NAMES, vocabs, strict=True):
        for name, array in zip(("keys", "ids"), _hash_table(vocab), strict=True):
            path = tables / f"{c}.{name}.npy"
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, array)


OUTPUT_SCHEMA = pa.schema(
    [(LABEL, pa.int8())]
    + [(c, pa.float32()) for c in DENSE_NAMES]
    + [(c, pa.int64()) for c in SPARSE_NAMES]
)


def _encode(block: Block, encoder: _Encoder) -> pa.Table:
    arrays = [pa.array(block.label)] + [pa.array(x) for x in block.dense]
    arrays += [pa.array(encoder.ids(f, *block.hex[f])) for f in range(len(SPARSE_NAMES))]
    return pa.Table.from_arrays(arrays, schema=OUTPUT_SCHEMA)


def _write_chunk(task: Task, opts: Options, out: str, encoder: _Encoder, progress: Any) -> None:
    """The encoding pass for one chunk: its shards, then (hash: read from the TSV) its
    rejects, then its done record, last. The vocab encoding reads the rows that its first
    pass staged, and drops them once the chunk is done."""
    out_dir, work = Path(out), Path(out) / WORK
    shard_dir = out_dir / "data" / task.source
    shard_dir.mkdir(parents=True, exist_ok=True)
    for stale in shard_dir.glob(f"part-{task.index:05d}-*"):  # an interrupted earlier try
        stale.unlink()
    files: list[dict[str, Any]] = []
    writer: pq.ParquetWriter | None = None
    shard_rows = 0

    def shard_path(k: int) -> Path:
        return shard_dir / f"part-{task.index:05d}-{k:03d}.parquet"

    def close_shard() -> None:
        nonlocal writer, shard_rows
        if writer is None:
            return
        writer.close()
        final = shard_path(len(files))
        os.replace(final.with_name(final.name + ".tmp"), final)
        files.append({"path": str(final.relative_to(out_dir)), "rows": shard_rows})
        writer, shard_rows = None, 0

    summary: dict[str, Any] = {}
    staged, summary_path = _staged(work, task)
    report = _Progress(progress)
    if encoder.tables is None:
        blocks = _with_rejects(_read_blocks(task, opts, report),
                               work / "rejects" / f"{task.key}.tsv", summary)
    else:
        summary = json.loads(summary_path.read_text())
        blocks = _read_staged(staged)
    for block in blocks:
        batch = _encode(block, encoder)
        start = 0
        while start < batch.num_rows:
            if writer is None:
                tmp = shard_path(len(files))
                writer = pq.ParquetWriter(tmp.with_name(tmp.name + ".tmp"), OUTPUT_SCHEMA)
            take = min(SHARD_ROWS - shard_rows, batch.num_rows - start)
            writer.write_table(batch.slice(start, take), row_group_size=ROW_GROUP_ROWS)
            shard_rows += take
            start += take
            if shard_rows == SHARD_ROWS:
                close_shard()
    close_shard()
    if encoder.tables is not None:  # the bar counts input bytes, here the chunk's
        report(task.bytes)
    report.flush()
    accepted = sum(f["rows"] for f in files)
    rejected = sum(summary["rejected_by_reason"].values())
    atomic_write_json(work / "done" / f"{task.key}.json", {
        "task": asdict(task), "rows_accepted": accepted, "rows_rejected": rejected,
        "rejected_by_reason": summary["rejected_by_reason"], "files": files,
        "lines": summary["lines"],
    })
    staged.unlink(missing_ok=True)


# --------------------------------------------------------------------------- driver


class _Progress:
    """A worker's bytes-read callback: sends the driver's bar batched updates (``queue``:
    the driver's, None when there is no bar); ``flush`` when a chunk is done."""

    def __init__(self, queue: Any) -> None:
        self.queue, self.pending = queue, 0

    def __call__(self, n: int) -> None:
        self.pending += n
        if self.pending >= 8 << 20:
            self.flush()

    def flush(self) -> None:
        if self.queue is not None and self.pending:
            self.queue.put(self.pending)
        self.pending = 0


def _atomic_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


def _fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _run(pool: ProcessPoolExecutor, fn: Callable, tasks: list[Task], args: tuple,
         bar: tqdm | None, updates: Any) -> None:
    """Runs ``fn(task, *args, updates)`` for every task, feeding the progress bar."""
    pending: set[Future] = {pool.submit(fn, t, *args, updates) for t in tasks}
    while pending:
        done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
        for fut in done:
            fut.result()  # re-raises a worker's error here
        if updates is not None:
            while True:
                try:
                    n = updates.get_nowait()
                except queue.Empty:
                    break
                if bar is not None:
                    bar.update(n)


def _check_inputs(paths: list[Path], encoding: Encoding) -> None:
    if not paths:
        raise PreprocessError("no input files given")
    for p in paths:
        if not p.is_file():
            raise PreprocessError(f"input not found or not a file: {p}")
        try:
            with open(p, "rb") as f:
                f.read(1)
        except OSError as e:
            raise PreprocessError(f"input not readable: {p}: {e.strerror}") from None
    names = [source_name(p) for p in paths]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PreprocessError(f"inputs share source names {dupes}: rename them")
    if encoding.type not in ("vocab", "hash"):
        raise PreprocessError(f"unknown encoding {encoding.type!r} (vocab or hash)")
    if encoding.type == "hash" and encoding.buckets < 2:
        raise PreprocessError(f"hash buckets must be >= 2, got {encoding.buckets}")


def preprocess(inputs: list[str | Path], out: str | Path, workers: int = 0,
               encoding: Encoding = Encoding(), log: Callable[[str], Any] = print,
               options: Options | None = None) -> dict[str, Any]:
    """Preprocesses ``inputs`` into the dataset directory ``out``; returns the manifest.

    A rerun over a complete dataset made from the same (unchanged) inputs with the same
    encoding returns its manifest without redoing anything; a rerun over an interrupted
    one finishes it, redoing only the chunks that had not completed.

    Raises:
        PreprocessError: missing or unreadable input, clashing source names, an output
            directory that holds something else, or a write that failed (full disk).
    """
    t0 = time.time()
    opts = options or Options(workers=workers)
    paths = [Path(p) for p in inputs]
    _check_inputs(paths, encoding)
    out = Path(out)
    plan = {"format": FORMAT, "encoding": encoding.to_json(),
            "sources": [_fingerprint(p) for p in paths]}

    if (out / MANIFEST).exists():
        old = load_manifest(out)
        same = (old.get("encoding") == plan["encoding"]
                and [{k: s[k] for k in ("path", "bytes", "mtime_ns")} for s in old["sources"]]
                == plan["sources"])
        if same:
            log(f"preprocess: {out} already holds this dataset; nothing to do")
            return old
        raise PreprocessError(f"{out} already holds another dataset ({out / MANIFEST}); "
                              "choose another --out")
    work = out / WORK
    plan_path = work / "plan.json"
    if plan_path.exists():
        if json.loads(plan_path.read_text()) != plan:
            raise PreprocessError(f"{out} holds an unfinished run over other inputs or another "
                                  f"encoding ({plan_path}); choose another --out or delete it")
        log(f"preprocess: resuming the unfinished run in {out}")
    elif out.exists() and any(out.iterdir()):
        raise PreprocessError(f"{out} is not empty and holds no dlrm dataset; choose another --out")

    try:
        return _preprocess(paths, out, opts, encoding, plan, t0, log)
    except OSError as e:
        raise PreprocessError(f"writing under {out} failed: {e}") from None


def _preprocess(paths: list[Path], out: Path, opts: Options, encoding: Encoding,
                plan: dict[str, Any], t0: float, log: Callable[[str], Any]) -> dict[str, Any]:
    work = out / WORK
    for sub in ("counts", "staged", "rejects", "done"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / "plan.json", plan)
    tasks = _plan_tasks(paths, opts.chunk_bytes)
    # Largest first: the pool's tail is then short.
    by_size = sorted(tasks, key=lambda t: -t.bytes)
    workers = min(opts.workers or os.cpu_count() or 1, len(tasks))
    ctx = get_context("spawn")
    total = sum(p.stat().st_size for p in paths)
    passes = 2 if encoding.type == "vocab" else 1
    bar = tqdm(total=total * passes, unit="B", unit_scale=True, desc="preprocess",
               dynamic_ncols=True) if os.isatty(1) else None
    manager = ctx.Manager() if bar is not None else contextlib.nullcontext()
    with manager, ProcessPoolExecutor(workers, mp_context=ctx,
                                                initializer=keep_freed_memory) as pool:
        updates = manager.Queue() if bar is not None else None
        tables = None
        if encoding.type == "vocab":
            # A chunk is counted once its counts exist; its staged rows are needed until
            # the chunk is written (an unfinished run of an older version had none).
            todo = [t for t in by_size if not (
                (work / "counts" / f"{t.key}.npz").exists()
                and ((work / "done" / f"{t.key}.json").exists() or _staged(work, t)[0].exists()))]
            _run(pool, _count_chunk, todo, (opts, str(work)), bar, updates)
            vocabs = _merge_vocab(tasks, work, encoding)
            _atomic_npz(out / "vocab.npz", dict(zip(SPARSE_NAMES, vocabs, strict=True)))
            cardinalities = [int(v.size) + 2 for v in vocabs]
            tables = work / "tables"
            _save_tables(vocabs, tables)
        else:
            cardinalities = [encoding.buckets] * len(SPARSE_NAMES)
        todo = [t for t in by_size if not (work / "done" / f"{t.key}.json").exists()]
        encoder = _Encoder(encoding, str(tables) if tables else None)
        _run(pool, _write_chunk, todo, (opts, str(out), encoder), bar, updates)
    if bar is not None:
        bar.close()

    manifest = _finish(paths, tasks, out, encoding, cardinalities, t0)
    read = manifest["rows_accepted"] + manifest["rows_rejected"]
    log(f"preprocess: {read} rows read, {manifest['rows_accepted']} accepted, "
        f"{manifest['rows_rejected']} rejected {manifest['rejected_by_reason']} "
        f"in {manifest['seconds']:.1f}s -> {out}")
    return manifest


def _merge_vocab(tasks: list[Task], work: Path, encoding: Encoding) -> list[np.ndarray]:
    vocabs = []
    for c in SPARSE_NAMES:
        parts = []
        for t in tasks:
            with np.load(work / "counts" / f"{t.key}.npz") as z:
                parts.append((z[f"{c}_values"], z[f"{c}_counts"]))
        vocabs.append(build_vocab(_compact(parts), encoding))
    return vocabs


def _finish(paths: list[Path], tasks: list[Task], out: Path, encoding: Encoding,
            cardinalities: list[int], t0: float) -> dict[str, Any]:
    """Per-source rejects with file-wide line numbers, then the manifest, then cleanup."""
    work = out / WORK
    sources = []
    (out / "rejects").mkdir(exist_ok=True)
    for p in paths:
        name = source_name(p)
        chunks = [t for t in tasks if t.source == name]
        reasons: Counter[str] = Counter()
        files, offset = [], 0
        with atomic_path(out / "rejects" / f"{name}.tsv") as tmp, open(tmp, "wb") as merged:
            for t in sorted(chunks, key=lambda t: t.index):
                done = json.loads((work / "done" / f"{t.key}.json").read_text())
                reasons.update(done["rejected_by_reason"])
                files += done["files"]
                with open(work / "rejects" / f"{t.key}.tsv", "rb") as part:
                    for line in part:
                        number, rest = line.split(b"\t", 1)
                        merged.write(b"%d\t%s" % (int(number) + offset, rest))
                offset += done["lines"]
        accepted, rejected = sum(f["rows"] for f in files), sum(reasons.values())
        sources.append({
            "name": name, **_fingerprint(p), "rows_read": accepted + rejected,
            "rows_accepted": accepted, "rows_rejected": rejected,
            "rejected_by_reason": dict(sorted(reasons.items())), "files": files,
        })
    reasons = Counter()
    for s in sources:
        reasons.update(s["rejected_by_reason"])
    manifest = {
        "format": FORMAT,
        "schema": {
            "label": LABEL, "dense": DENSE_NAMES, "sparse": SPARSE_NAMES,
            "dense_transform": "missing -> 0, negative -> 0, log1p; float32",
            "sparse_ids": f"{MISSING_ID} = missing, {OOV_ID} = out of vocabulary, "
                          "2.. = vocabulary by descending frequency "
                          "(hash: 1 + value % (buckets-1))",
        },
        "encoding": encoding.to_json(),
        "cardinalities": cardinalities,
        "sources": sources,
        "rows_accepted": sum(s["rows_accepted"] for s in sources),
        "rows_rejected": sum(s["rows_rejected"] for s in sources),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "seconds": round(time.time() - t0, 3),
    }
    atomic_write_json(out / MANIFEST, manifest)
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def load_manifest(dataset: str | Path) -> dict[str, Any]:
    """Reads a dataset's manifest; a clear error if the dataset is missing or incomplete."""
    path = Path(dataset) / MANIFEST
    if not Path(dataset).is_dir():
        raise PreprocessError(f"dataset directory not found: {dataset}")
    if not path.is_file():
        raise PreprocessError(
            f"{path} not found: {dataset} is not a complete dataset (run `dlrm preprocess`)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PreprocessError(f"{path}: corrupt manifest: {e}") from None
    if manifest.get("format") != FORMAT:
        raise PreprocessError(f"{path}: unknown format {manifest.get('format')!r}, want {FORMAT}")
    return manifest

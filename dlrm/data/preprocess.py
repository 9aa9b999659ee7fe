"""Criteo TSV / TSV.gz → Parquet shards + manifest.json: parallel, streaming, resumable.

Work is cut into *chunks*: byte ranges of plain files (a chunk owns the lines that start
inside its range), whole files for gzip (a stream cannot be entered in the middle).
``workers`` processes take chunks from a queue. Each chunk is read in blocks of
``block_bytes`` and never held whole, so a worker's memory is a few blocks plus, for the
vocab pass, the distinct values its chunk has seen: bounded by block size and vocabulary,
not by file size.

1. ``vocab`` encoding only: every chunk counts each categorical value per feature and
   saves its counts; the counts of all chunks are merged exactly; each feature's
   vocabulary is the values seen at least ``min_frequency`` times, by descending count
   (ties by value), capped at ``max_vocab``.
2. Every chunk is validated, transformed and written as Parquet shards.

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
from dlrm.fsutil import atomic_write_json

MANIFEST = "manifest.json"
FORMAT = "dlrm-criteo-parquet/1"
WORK = "_work"  # in-progress state; removed once the manifest is written
ROW_GROUP_ROWS = 1 << 16
SHARD_ROWS = 1 << 20
REJECT_REASONS = ("line_too_long", "truncated_gzip", "empty_line", "invalid_utf8",
                  "wrong_field_count", "bad_label", "bad_dense", "bad_categorical")
_DENSE_RE = r"^(-?[0-9]{1,18})?$"
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
    """Good rows of one block (binary columns, categoricals parsed) and the block's rejects."""

    table: pa.Table
    hex: Hex
    rejects: list[Reject]
    lines: int  # lines of the chunk consumed up to the end of this block


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
        """Yields buffers of whole lines (each ending in a newline)."""
        f, end = self._open()
        with f:
            pos = f.tell()  # offset (plain file) of the first byte of ``carry``
            carry, skipping = b"", False
            while end < 0 or pos < end:  # past ``end``, lines start in the next chunk
                data = f.read(self.opts.block_bytes)
                self.progress(f.raw_read_delta() if self.task.gzip else len(data))
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
        for i in np.unique(np.searchsorted(ends, np.flatnonzero(arr >= 0x80))):
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
            table, hex_, parse_rejects = _parse(buf, first_line + kept)
            rejects += parse_rejects
        else:
            table, hex_ = _empty()
        yield Block(table, hex_, sorted(rejects, key=lambda r: r.line), reader.lines)
    if reader.rejects:
        yield Block(*_empty(), reader.rejects, reader.lines)


def _empty() -> tuple[pa.Table, Hex]:
    table = pa.table({c: pa.array([], pa.binary()) for c in TSV_COLUMNS})
    return table, [(np.zeros(0, np.uint64), np.zeros(0, bool)) for _ in SPARSE_NAMES]


def _parse(buf: bytes, line_of: np.ndarray) -> tuple[pa.Table, Hex, list[Reject]]:
    """Splits the fields of ``buf`` (whole lines); rows with problems become rejects.

    ``line_of[k]`` is the line number of the k-th line of ``buf``.
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
    reason, hex_ = _row_problems(table)
    bad = np.flatnonzero(reason >= 0)
    if bad.size:
        texts = _join_fields(table.take(bad))
        for i, text in zip(bad, texts, strict=True):
            why = REJECT_REASONS[int(reason[i])]
            rejects.append(Reject(int(valid_lines[i]), why, text[:_REJECT_TEXT_BYTES]))
        good = reason < 0
        table = table.filter(pa.array(good))
        hex_ = [(v[good], p[good]) for v, p in hex_]
    return table, hex_, rejects


def _row_problems(table: pa.Table) -> tuple[np.ndarray, Hex]:
    """Per row: -1 if valid, else the index of its first problem in REJECT_REASONS; and
    the parsed categorical values."""
    reason = np.full(table.num_rows, -1, dtype=np.int64)

    def mark(bad: np.ndarray, why: str) -> None:
        reason[(reason < 0) & bad] = REJECT_REASONS.index(why)

    label = table.column(LABEL)
    ok = pc.is_in(label, pa.array([b"0", b"1"], pa.binary()))
    mark(~ok.to_numpy(zero_copy_only=False), "bad_label")
    for c in DENSE_NAMES:
        ok = pc.match_substring_regex(table.column(c), _DENSE_RE)
        mark(~ok.to_numpy(zero_copy_only=False), "bad_dense")
    hex_ = []
    for c in SPARSE_NAMES:
        values, present, ok = _hex_values(table.column(c))
        mark(~ok, "bad_categorical")
        hex_.append((values, present))
    return reason, hex_


def _join_fields(table: pa.Table) -> list[bytes]:
    cols = [table.column(c).to_pylist() for c in TSV_COLUMNS]
    return [b"\t".join(fields) for fields in zip(*cols, strict=True)]


_HEX = np.full(256, 255, np.uint8)  # byte → hex digit value, 255: not a hex digit
for _i, _ch in enumerate(b"0123456789abcdef"):
    _HEX[_ch] = _i
    _HEX[bytes([_ch]).upper()[0]] = _i


def _hex_values(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hex fields → (uint64 values, present, valid), vectorised over the raw bytes.

    Each field's digits are gathered into a fixed window (8 digits when every field has
    8 or none, as in Criteo; else 16, right-aligned), mapped through a lookup table,
    packed two digits a byte and read as big-endian integers. Empty is "missing"
    (present False, valid True); more than 16 digits or a non-hex byte is invalid.
    """
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset: arr.offset + n + 1]
    raw = arr.buffers()[2]
    raw = np.frombuffer(raw, np.uint8) if raw is not None else np.zeros(0, np.uint8)
    pad = np.zeros(16, np.uint8)
    data = np.concatenate([pad, raw[offsets[0]:offsets[-1]] if n else raw[:0], pad])
    starts = offsets[:-1].astype(np.int64) - offsets[0] + 16
    lengths = np.diff(offsets).astype(np.int64)
    if np.all((lengths == 8) | (lengths == 0)):
        digits = _HEX[data[starts[:, None] + np.arange(8)]]
        digits[lengths == 0] = 0
    else:
        digits = _HEX[data[(starts + lengths)[:, None] - 16 + np.arange(16)]]
        digits[np.arange(16) < 16 - np.minimum(lengths, 16)[:, None]] = 0
    valid = (lengths <= 16) & ~np.any(digits == 255, axis=1)
    if not valid.all():
        digits[~valid] = 0
    packed = np.ascontiguousarray((digits[:, 0::2] << 4) | digits[:, 1::2])
    values = packed.view(">u4" if digits.shape[1] == 8 else ">u8").ravel().astype(np.uint64)
    return values, lengths > 0, valid


# --------------------------------------------------------------------------- pass 1


def _compact(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Merges (values, counts) pairs into one, summing the counts of equal values."""
    if not parts:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    values = np.concatenate([v for v, _ in parts])
    counts = np.concatenate([c for _, c in parts])
    uniq, inverse = np.unique(values, return_inverse=True)
    return uniq, np.bincount(inverse, weights=counts, minlength=uniq.size).astype(np.int64)


def _count_chunk(task: Task, opts: Options, work: str, progress: Any) -> None:
    """Pass 1 for one chunk: per-feature value counts, saved atomically to the work dir."""
    parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in SPARSE_NAMES]
    for block in _read_blocks(task, opts, _reporter(progress)):
        for f, (values, present) in enumerate(block.hex):
            parts[f].append(np.unique(values[present], return_counts=True))
            if len(parts[f]) >= 16:  # keep memory at the chunk's distinct values
                parts[f] = [_compact(parts[f])]
    merged = [_compact(p) for p in parts]
    out = Path(work) / "counts" / f"{task.key}.npz"
    arrays = {f"{c}_values": v for c, (v, _) in zip(SPARSE_NAMES, merged, strict=True)}
    arrays |= {f"{c}_counts": n for c, (_, n) in zip(SPARSE_NAMES, merged, strict=True)}
    _atomic_npz(out, arrays)


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


class _Encoder:
    def __init__(self, enc: Encoding, vocabs: list[np.ndarray] | None):
        self.enc = enc
        self.lookup = None
        if vocabs is not None:  # sorted values and their ids, for searchsorted
            self.lookup = []
            for vocab in vocabs:
                order = np.argsort(vocab)
                self.lookup.append((vocab[order], order.astype(np.int64) + 2))

    def ids(self, f: int, values: np.ndarray, present: np.ndarray) -> np.ndarray:
        if self.lookup is None:
            ids = (values % np.uint64(self.enc.buckets - 1)).astype(np.int64) + 1
        elif self.lookup[f][0].size == 0:
            ids = np.full(values.size, OOV_ID, np.int64)
        else:
            keys, key_ids = self.lookup[f]
            pos = np.minimum(np.searchsorted(keys, values), keys.size - 1)
            ids = np.where(keys[pos] == values, key_ids[pos], OOV_ID)
        return np.where(present, ids, MISSING_ID).astype(np.int64)


def _dense(column: pa.ChunkedArray) -> np.ndarray:
    text = pc.cast(column, pa.string())
    ints = pc.cast(pc.if_else(pc.equal(text, ""), None, text), pa.int64())
    x = ints.fill_null(0).to_numpy().astype(np.float64)
    return np.log1p(np.maximum(x, 0.0)).astype(np.float32)


OUTPUT_SCHEMA = pa.schema(
    [(LABEL, pa.int8())]
    + [(c, pa.float32()) for c in DENSE_NAMES]
    + [(c, pa.int64()) for c in SPARSE_NAMES]
)


def _encode(block: Block, encoder: _Encoder) -> pa.Table:
    table = block.table
    label = pc.equal(table.column(LABEL), pa.scalar(b"1", pa.binary())).to_numpy(
        zero_copy_only=False).astype(np.int8)
    arrays = [pa.array(label)]
    arrays += [pa.array(_dense(table.column(c))) for c in DENSE_NAMES]
    arrays += [pa.array(encoder.ids(f, *block.hex[f])) for f in range(len(SPARSE_NAMES))]
    return pa.Table.from_arrays(arrays, schema=OUTPUT_SCHEMA)


def _write_chunk(task: Task, opts: Options, out: str, encoder: _Encoder, progress: Any) -> None:
    """Pass 2 for one chunk: shards, then its rejects, then its done record (last)."""
    out_dir, work = Path(out), Path(out) / WORK
    shard_dir = out_dir / "data" / task.source
    shard_dir.mkdir(parents=True, exist_ok=True)
    for stale in shard_dir.glob(f"part-{task.index:05d}-*"):  # an interrupted earlier try
        stale.unlink()
    files: list[dict[str, Any]] = []
    reasons: Counter[str] = Counter()
    writer: pq.ParquetWriter | None = None
    shard_rows, lines = 0, 0
    reject_path = work / "rejects" / f"{task.key}.tsv"

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

    with open(reject_path.with_name(reject_path.name + ".tmp"), "wb") as rejects:
        for block in _read_blocks(task, opts, _reporter(progress)):
            lines = block.lines
            for r in block.rejects:
                reasons[r.reason] += 1
                rejects.write(b"%d\t%s\t%s\n" % (r.line, r.reason.encode(), _one_line(r.text)))
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
    os.replace(reject_path.with_name(reject_path.name + ".tmp"), reject_path)
    accepted = sum(f["rows"] for f in files)
    rejected = sum(reasons.values())
    atomic_write_json(work / "done" / f"{task.key}.json", {
        "task": asdict(task), "rows_accepted": accepted, "rows_rejected": rejected,
        "rejected_by_reason": dict(sorted(reasons.items())), "files": files,
        "lines": lines,
    })


def _one_line(text: bytes) -> bytes:
    return text.replace(b"\n", b"\\n").replace(b"\r", b"\\r")


# --------------------------------------------------------------------------- driver


def _reporter(progress: Any) -> Callable[[int], None]:
    """Bytes-read callback for workers: batches updates into the driver's queue."""
    if progress is None:
        return lambda n: None
    pending = [0]

    def report(n: int) -> None:
        pending[0] += n
        if pending[0] >= 8 << 20:
            progress.put(pending[0])
            pending[0] = 0

    return report


def _atomic_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name.removesuffix(".npz") + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


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
    for sub in ("counts", "rejects", "done"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / "plan.json", plan)
    tasks = _plan_tasks(paths, opts.chunk_bytes)
    # Largest first: the pool's tail is then short.
    by_size = sorted(tasks, key=lambda t: -(Path(t.path).stat().st_size if t.gzip
                                            else t.end - t.start))
    workers = min(opts.workers or os.cpu_count() or 1, len(tasks))
    ctx = get_context("spawn")
    total = sum(p.stat().st_size for p in paths)
    passes = 2 if encoding.type == "vocab" else 1
    bar = tqdm(total=total * passes, unit="B", unit_scale=True, desc="preprocess",
               dynamic_ncols=True) if os.isatty(1) else None
    manager = ctx.Manager() if bar is not None else contextlib.nullcontext()
    with manager, ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        updates = manager.Queue() if bar is not None else None
        vocabs = None
        if encoding.type == "vocab":
            todo = [t for t in by_size if not (work / "counts" / f"{t.key}.npz").exists()]
            _run(pool, _count_chunk, todo, (opts, str(work)), bar, updates)
            vocabs = _merge_vocab(tasks, work, encoding)
            _atomic_npz(out / "vocab.npz", dict(zip(SPARSE_NAMES, vocabs, strict=True)))
            cardinalities = [int(v.size) + 2 for v in vocabs]
        else:
            cardinalities = [encoding.buckets] * len(SPARSE_NAMES)
        todo = [t for t in by_size if not (work / "done" / f"{t.key}.json").exists()]
        _run(pool, _write_chunk, todo, (opts, str(out), _Encoder(encoding, vocabs)), bar,
             updates)
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
        tmp = out / "rejects" / f"{name}.tsv.tmp"
        with open(tmp, "wb") as merged:
            for t in sorted(chunks, key=lambda t: t.index):
                done = json.loads((work / "done" / f"{t.key}.json").read_text())
                reasons.update(done["rejected_by_reason"])
                files += done["files"]
                with open(work / "rejects" / f"{t.key}.tsv", "rb") as part:
                    for line in part:
                        number, rest = line.split(b"\t", 1)
                        merged.write(b"%d\t%s" % (int(number) + offset, rest))
                offset += done["lines"]
        os.replace(tmp, out / "rejects" / f"{name}.tsv")
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

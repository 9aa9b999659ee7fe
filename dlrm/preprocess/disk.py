"""What a preprocessing run will need on disk, estimated before any work starts.

The first ``SAMPLE_BYTES`` of the first plain input are parsed as the run will parse them,
and their rows written in memory as the run would write them: staged (Arrow IPC, LZ4) and
as shards (Parquet, ids hashed to 24 bits: larger than vocabulary ids, so the estimate
errs high). Bytes out per byte in, times the inputs' size, plus ``MARGIN``; and for the
vocab encoding ``BYTES_PER_VALUE`` per distinct value, their number grown from the
sample's by the exponent of Heaps' law its two halves show (sublinear in the rows, as
real logs' vocabularies are). A gzip input
counts ``GZIP_EXPANSION`` times its size (Criteo's days compress about 4 to 1); with
only gzip (or Parquet) inputs nothing is sampled and fixed ratios are assumed.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dlrm.errors import PreprocessError
from dlrm.preprocess.staging import IPC_OPTIONS, stage_batch, staged_schema
from dlrm.rows.chunks import Options, Task, source_name
from dlrm.rows.encode import encode
from dlrm.rows.layout import Layout
from dlrm.rows.vocab import Encoder, Encoding

SAMPLE_BYTES = 8 << 20
GZIP_EXPANSION = 4.5
MARGIN = 1.15
CRITEO_RATIOS = (0.45, 0.40)  # shards, staged rows per byte of Criteo's TSV (measured)


# Per distinct value: chunk counts (~2 x 16), merged partition 16, vocabulary file and
# vocab.npz 2 x 8, tables 32 (12 per slot, 2-4 slots per value).
BYTES_PER_VALUE = 96
# The most a byte of plain text can become: a field takes at least 1 byte (its delimiter)
# and becomes an 8-byte id or value in the shards and 8 more staged; a distinct value
# takes at least 2 and BYTES_PER_VALUE / 2 = 48 per byte. Compression only lowers these.
CEILING = 8 + 8 + BYTES_PER_VALUE // 2
FLOOR = 64 << 20


@dataclass(frozen=True)
class DiskNeeds:
    shards: int  # the dataset's Parquet files (and its vocabularies, counts and tables)
    staged: int  # the vocab encoding's parsed rows between its two passes

    def text(self) -> str:
        return f"{self.shards:,} bytes of shards, {self.staged:,} staged"


@dataclass(frozen=True)
class _Sample:
    shard_ratio: float  # bytes out per byte of text
    staged_ratio: float
    rows: int
    distinct: list[tuple[int, int]]  # per vocab feature: distinct values in half, in all


def _sample(path: Path, layout: Layout) -> _Sample | None:
    """What ``path``'s first rows write, per byte of text; None if none parse."""
    task = Task(source_name(path), str(path), 0, 0, min(path.stat().st_size, SAMPLE_BYTES))
    hashed = dataclasses.replace(layout, encodings=tuple(
        Encoding("hash", buckets=1 << 24) for _ in layout.encodings))
    encoder = Encoder(hashed.sparse, hashed.encodings)
    shards, staged = pa.BufferOutputStream(), pa.BufferOutputStream()
    rows, values = 0, [[] for _ in layout.sparse]
    with pq.ParquetWriter(shards, hashed.output_schema()) as pw, \
            pa.ipc.new_file(staged, staged_schema(layout), options=IPC_OPTIONS) as iw:
        for block in layout.blocks(task, Options(block_bytes=SAMPLE_BYTES), lambda n: None):
            if block.label.size:
                pw.write_table(encode(block, encoder, hashed))
                iw.write_batch(stage_batch(block, layout))
                rows += block.label.size
                for f, (v, _) in enumerate(block.hex):
                    values[f].append(v)
    if not rows:
        return None
    distinct = []
    for f, enc in enumerate(layout.encodings):
        if enc.type == "vocab":
            v = np.concatenate(values[f])
            distinct.append((np.unique(v[:v.size // 2]).size, np.unique(v).size))
    return _Sample(shards.getvalue().size / task.end, staged.getvalue().size / task.end,
                   rows, distinct)


def _distinct(sample: _Sample, rows: float) -> float:
    """Distinct values of all vocab features in ``rows`` rows: each feature's count grown
    from the sample as Heaps' law has it, by the exponent its two halves show."""
    total = 0.0
    for half, full in sample.distinct:
        beta = min(max(np.log2(full / half), 0.0), 1.0) if half else 1.0
        total += min(full * (rows / sample.rows) ** beta, rows)
    return total


def estimate(paths: list[Path], layout: Layout) -> DiskNeeds:
    """The bytes each stage will write for ``paths``."""
    text = sum(p.stat().st_size * (GZIP_EXPANSION if p.suffix == ".gz" else 1) for p in paths)
    parquet = layout.schema.format == "parquet"
    plain = [p for p in paths if p.suffix != ".gz" and p.stat().st_size]
    sample = _sample(plain[0], layout) if plain and not parquet else None
    if sample is None:  # Parquet input (columnar already): as large again; else Criteo's
        shard_ratio, staged_ratio = (1.0, 1.0) if parquet else CRITEO_RATIOS
        vocab = 0.0  # unknown: the margin has to cover it
    else:
        shard_ratio, staged_ratio = sample.shard_ratio, sample.staged_ratio
        rows = sample.rows * text / min(plain[0].stat().st_size, SAMPLE_BYTES)
        vocab = _distinct(sample, rows) * BYTES_PER_VALUE
    staged = int(text * staged_ratio * MARGIN) if layout.vocab else 0
    return DiskNeeds(int((text * shard_ratio + vocab) * MARGIN), staged)


def surely_fits(paths: list[Path], layout: Layout, free: int) -> bool:
    """Whether ``free`` bytes hold whatever plain-text ``paths`` can become, so that the
    estimate (a sample parsed) is not needed: per byte of text at most ``CEILING`` bytes,
    plus ``FLOOR`` for files' fixed costs. Gzip and Parquet inputs can expand without such
    a bound."""
    if any(p.suffix == ".gz" for p in paths) or layout.schema.format == "parquet":
        return False
    return free >= CEILING * sum(p.stat().st_size for p in paths) + FLOOR


def free_bytes(out: Path) -> tuple[int, Path]:
    """Free bytes of the file system ``out`` is (or will be) on, and the directory asked."""
    where = out.resolve()
    while not where.exists():
        where = where.parent
    return shutil.disk_usage(where).free, where


def choose_staging(paths: list[Path], layout: Layout, out: Path, stage: bool,
                   log: Callable[[str], Any]) -> bool:
    """Whether to stage the vocab encoding's parsed rows (``stage``: if asked and there is
    a counting pass), by the free space of ``out``'s file system: staging where the shards
    and the staged rows fit, parsing twice where only the shards fit; PreprocessError
    naming both figures, before anything is written, where not even the shards fit."""
    free, where = free_bytes(out)
    if surely_fits(paths, layout, free):  # nothing to sample
        return stage
    needs = estimate(paths, layout)
    if free < needs.shards:
        raise PreprocessError(f"{out}: not enough disk: about {needs.shards:,} bytes needed "
                              f"for the shards, {free:,} free on {where}")
    if stage and free < needs.shards + needs.staged:
        log(f"preprocess: {free:,} bytes free on {where}, short of the {needs.text()}: "
            "parsing the inputs twice instead of staging them")
        return False
    return stage

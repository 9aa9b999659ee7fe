"""Criteo TSV / TSV.gz → Parquet shards + manifest.json, with pyarrow.

Two passes over the sources, each parallel over source files (``workers`` processes):

1. ``vocab`` encoding only: count every categorical value per feature; counts of all
   sources are merged exactly, then each feature's vocabulary is the values seen at
   least ``min_frequency`` times, ordered by descending count (ties by value), capped
   at ``max_vocab`` when given.
2. Validate, transform and write each source as Parquet shards.

Dense features: missing → 0, negative → 0, then ``log1p``, stored as float32 (done once
here, so training and evaluation read the same numbers). Categorical features: hex →
uint64 → id, kept as integers all the way (int64 in Parquet); ids follow
``schema.MISSING_ID`` / ``schema.OOV_ID``. Bad rows are counted by reason and written to
``rejects/<source>.tsv`` with their line number; the good rows around them are kept.
``manifest.json`` is written last, atomically: a dataset is complete iff it exists.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dlrm.data.schema import DENSE_NAMES, LABEL, MISSING_ID, OOV_ID, SPARSE_NAMES, TSV_COLUMNS

MANIFEST = "manifest.json"
FORMAT = "dlrm-criteo-parquet/1"
READ_BLOCK_BYTES = 16 << 20
ROW_GROUP_ROWS = 1 << 16
SHARD_ROWS = 1 << 20
REJECT_REASONS = ("wrong_field_count", "empty_line", "bad_label", "bad_dense", "bad_categorical")
_DENSE_RE = r"^(-?[0-9]{1,18})?$"
_HEX_RE = r"^([0-9a-fA-F]{1,16})?$"


class PreprocessError(RuntimeError):
    """A fatal condition (missing input, unusable output directory); names the path."""


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


def source_name(path: Path) -> str:
    """``/x/day_3.gz`` → ``day_3``; ``train.txt`` → ``train``."""
    name = path.name
    for suffix in (".gz", ".tsv", ".txt", ".csv"):
        name = name.removesuffix(suffix)
    return name


# --------------------------------------------------------------------------- reading


@dataclass
class Chunk:
    """Good rows of one read block, plus the block's rejects."""

    table: pa.Table  # the valid rows, all columns strings
    rejects: list[tuple[int, str, str]]  # (line, reason, text)


def _read_chunks(path: Path) -> Iterator[Chunk]:
    """Streams a TSV in blocks; validation is vectorised, bad rows go to ``rejects``."""
    invalid: list[tuple[int, str]] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        invalid.append((row.number, row.text))
        return "skip"

    compression = "gzip" if path.suffix == ".gz" else None
    with pa.input_stream(path, compression=compression) as probe:
        if not probe.read(1):  # an empty source has no rows (pyarrow refuses empty CSVs)
            return
    reader = pacsv.open_csv(
        pa.input_stream(path, compression=compression),
        read_options=pacsv.ReadOptions(
            column_names=TSV_COLUMNS, use_threads=False, block_size=READ_BLOCK_BYTES
        ),
        parse_options=pacsv.ParseOptions(
            delimiter="\t", quote_char=False, ignore_empty_lines=False,
            invalid_row_handler=on_invalid,
        ),
        convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in TSV_COLUMNS}),
    )
    # Physical line numbers of valid rows are recovered from the sorted invalid lines.
    invalid_lines = np.zeros(0, dtype=np.int64)
    valid_seen = 0
    for batch in reader:
        table = pa.Table.from_batches([batch])
        rejects = [(line, "wrong_field_count", text) for line, text in invalid]
        if invalid:
            invalid_lines = np.sort(np.r_[invalid_lines, [line for line, _ in invalid]])
            invalid.clear()
        reason = _row_problems(table)
        bad = np.flatnonzero(reason >= 0)
        if bad.size:
            k = valid_seen + bad + 1  # 1-based index among valid rows
            adj = invalid_lines - np.arange(invalid_lines.size)
            lines = k + np.searchsorted(adj, k, side="right")
            texts = _join_fields(table.take(bad))
            rejects += [(int(line), REJECT_REASONS[int(r)], text)
                        for line, r, text in zip(lines, reason[bad], texts, strict=True)]
            table = table.filter(pa.array(reason < 0))
        valid_seen += batch.num_rows
        yield Chunk(table, rejects)
    if invalid:  # rows after the last block
        yield Chunk(pa.table({c: pa.array([], pa.string()) for c in TSV_COLUMNS}),
                    [(line, "wrong_field_count", text) for line, text in invalid])


def _row_problems(table: pa.Table) -> np.ndarray:
    """Per row: -1 if valid, else the index of its first problem in REJECT_REASONS."""
    n = table.num_rows
    reason = np.full(n, -1, dtype=np.int64)

    def mark(bad: pa.Array | pa.ChunkedArray, code: int) -> None:
        b = np.asarray(bad.to_numpy(zero_copy_only=False), dtype=bool)
        reason[(reason < 0) & b] = code

    lengths = [pc.binary_length(table.column(c)) for c in TSV_COLUMNS]
    total = lengths[0]
    for length in lengths[1:]:
        total = pc.add(total, length)
    mark(pc.equal(total, 0), REJECT_REASONS.index("empty_line"))
    mark(pc.invert(pc.is_in(table.column(LABEL), pa.array(["0", "1"]))),
         REJECT_REASONS.index("bad_label"))
    for c in DENSE_NAMES:
        mark(pc.invert(pc.match_substring_regex(table.column(c), _DENSE_RE)),
             REJECT_REASONS.index("bad_dense"))
    for c in SPARSE_NAMES:
        mark(pc.invert(pc.match_substring_regex(table.column(c), _HEX_RE)),
             REJECT_REASONS.index("bad_categorical"))
    return reason


def _join_fields(table: pa.Table) -> list[str]:
    cols = [table.column(c).to_pylist() for c in TSV_COLUMNS]
    return ["\t".join(fields) for fields in zip(*cols, strict=True)]


def _hex_to_u64(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Hex strings → (uint64 values, present mask); parses each distinct string once."""
    encoded = pc.dictionary_encode(column).combine_chunks()
    words = encoded.dictionary.to_pylist()
    parsed = np.array([int(w, 16) if w else 0 for w in words], dtype=np.uint64)
    present_word = np.array([bool(w) for w in words], dtype=bool)
    idx = encoded.indices.to_numpy(zero_copy_only=False)
    return parsed[idx], present_word[idx]


# --------------------------------------------------------------------------- pass 1


def _count_source(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per feature: (distinct values, counts) of one source's valid rows."""
    parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in SPARSE_NAMES]
    for chunk in _read_chunks(path):
        for f, c in enumerate(SPARSE_NAMES):
            values, present = _hex_to_u64(chunk.table.column(c))
            parts[f].append(np.unique(values[present], return_counts=True))
    return [_merge_counts(p) for p in parts]


def _merge_counts(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    values = np.concatenate([v for v, _ in parts])
    counts = np.concatenate([c for _, c in parts])
    uniq, inverse = np.unique(values, return_inverse=True)
    return uniq, np.bincount(inverse, weights=counts, minlength=uniq.size).astype(np.int64)


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

    def ids(self, f: int, column: pa.ChunkedArray) -> np.ndarray:
        values, present = _hex_to_u64(column)
        if self.lookup is None:
            ids = (values % np.uint64(self.enc.buckets - 1)).astype(np.int64) + 1
        else:
            keys, key_ids = self.lookup[f]
            pos = np.minimum(np.searchsorted(keys, values), max(keys.size - 1, 0))
            found = keys[pos] == values if keys.size else np.zeros(values.size, bool)
            ids = np.where(found, key_ids[pos] if keys.size else OOV_ID, OOV_ID)
        return np.where(present, ids, MISSING_ID).astype(np.int64)


def _dense(column: pa.ChunkedArray) -> np.ndarray:
    ints = pc.cast(pc.if_else(pc.equal(column, ""), None, column), pa.int64())
    x = ints.fill_null(0).to_numpy().astype(np.float64)
    return np.log1p(np.maximum(x, 0.0)).astype(np.float32)


OUTPUT_SCHEMA = pa.schema(
    [(LABEL, pa.int8())]
    + [(c, pa.float32()) for c in DENSE_NAMES]
    + [(c, pa.int64()) for c in SPARSE_NAMES]
)


def _write_source(path: Path, name: str, out: Path, encoder: _Encoder) -> dict[str, Any]:
    """Pass 2 for one source: shards under out/data/<name>/, rejects under out/rejects/."""
    shard_dir = out / "data" / name
    shard_dir.mkdir(parents=True, exist_ok=True)
    files: list[dict[str, Any]] = []
    reasons: Counter[str] = Counter()
    writer: pq.ParquetWriter | None = None
    shard_rows = 0
    reject_tmp = out / "rejects" / f"{name}.tsv.tmp"
    reject_tmp.parent.mkdir(parents=True, exist_ok=True)

    def close_shard() -> None:
        nonlocal writer, shard_rows
        if writer is None:
            return
        writer.close()
        final = shard_dir / f"part-{len(files):05d}.parquet"
        os.replace(final.with_suffix(".parquet.tmp"), final)
        files.append({"path": str(final.relative_to(out)), "rows": shard_rows})
        writer, shard_rows = None, 0

    with open(reject_tmp, "w", encoding="utf-8") as rejects:
        for chunk in _read_chunks(path):
            for line, reason, text in chunk.rejects:
                reasons[reason] += 1
                rejects.write(f"{line}\t{reason}\t{text}\n")
            t = chunk.table
            if t.num_rows == 0:
                continue
            arrays = [pa.array(pc.cast(t.column(LABEL), pa.int8()).to_numpy())]
            arrays += [pa.array(_dense(t.column(c))) for c in DENSE_NAMES]
            arrays += [pa.array(encoder.ids(f, t.column(c))) for f, c in enumerate(SPARSE_NAMES)]
            batch = pa.Table.from_arrays(arrays, schema=OUTPUT_SCHEMA)
            start = 0
            while start < batch.num_rows:
                if writer is None:
                    tmp = shard_dir / f"part-{len(files):05d}.parquet.tmp"
                    writer = pq.ParquetWriter(tmp, OUTPUT_SCHEMA)
                take = min(SHARD_ROWS - shard_rows, batch.num_rows - start)
                writer.write_table(batch.slice(start, take), row_group_size=ROW_GROUP_ROWS)
                shard_rows += take
                start += take
                if shard_rows == SHARD_ROWS:
                    close_shard()
    close_shard()
    os.replace(reject_tmp, out / "rejects" / f"{name}.tsv")
    accepted = sum(f["rows"] for f in files)
    rejected = sum(reasons.values())
    return {
        "name": name, "path": str(path.resolve()), "bytes": path.stat().st_size,
        "mtime_ns": path.stat().st_mtime_ns,
        "rows_read": accepted + rejected, "rows_accepted": accepted, "rows_rejected": rejected,
        "rejected_by_reason": dict(sorted(reasons.items())), "files": files,
    }


# --------------------------------------------------------------------------- driver


def _source_fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def preprocess(inputs: list[str | Path], out: str | Path, workers: int = 0,
               encoding: Encoding = Encoding(), log=print) -> dict[str, Any]:
    """Preprocesses ``inputs`` into the dataset directory ``out``; returns the manifest.

    A rerun over a complete dataset made from the same (unchanged) inputs with the same
    encoding returns its manifest without redoing anything.

    Raises:
        PreprocessError: missing or unreadable input, clashing source names, or an
            output directory that holds a different dataset.
    """
    t0 = time.time()
    paths = [Path(p) for p in inputs]
    if not paths:
        raise PreprocessError("no input files given")
    for p in paths:
        if not p.is_file():
            raise PreprocessError(f"input not found or not a file: {p}")
        if not os.access(p, os.R_OK):
            raise PreprocessError(f"input not readable: {p}")
    names = [source_name(p) for p in paths]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PreprocessError(f"inputs share source names {dupes}: rename them")
    if encoding.type not in ("vocab", "hash"):
        raise PreprocessError(f"unknown encoding {encoding.type!r} (vocab or hash)")
    if encoding.type == "hash" and encoding.buckets < 2:
        raise PreprocessError(f"hash buckets must be >= 2, got {encoding.buckets}")

    out = Path(out)
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        old = load_manifest(out)
        same = (old.get("encoding") == encoding.to_json()
                and [{k: s[k] for k in ("path", "bytes", "mtime_ns")} for s in old["sources"]]
                == [_source_fingerprint(p) for p in paths])
        if same:
            log(f"preprocess: {out} already holds this dataset; nothing to do")
            return old
        raise PreprocessError(
            f"{out} already holds another dataset ({manifest_path}); choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)

    workers = workers or os.cpu_count() or 1
    with ProcessPoolExecutor(min(workers, len(paths)), mp_context=get_context("spawn")) as pool:
        vocabs = None
        if encoding.type == "vocab":
            per_source = list(pool.map(_count_source, paths))
            merged = [_merge_counts([s[f] for s in per_source]) for f in range(len(SPARSE_NAMES))]
            vocabs = [build_vocab(c, encoding) for c in merged]
            np.savez(out / "vocab.tmp.npz", **dict(zip(SPARSE_NAMES, vocabs, strict=True)))
            os.replace(out / "vocab.tmp.npz", out / "vocab.npz")
            cardinalities = [int(v.size) + 2 for v in vocabs]
        else:
            cardinalities = [encoding.buckets] * len(SPARSE_NAMES)
        encoder = _Encoder(encoding, vocabs)
        sources = list(pool.map(_write_source, paths, names, [out] * len(paths),
                                [encoder] * len(paths)))

    reasons: Counter[str] = Counter()
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
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, manifest_path)
    read = manifest["rows_accepted"] + manifest["rows_rejected"]
    log(f"preprocess: {read} rows read, {manifest['rows_accepted']} accepted, "
        f"{manifest['rows_rejected']} rejected {manifest['rejected_by_reason']} "
        f"in {manifest['seconds']:.1f}s -> {out}")
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

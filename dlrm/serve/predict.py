"""Raw rows → predictions with an exported model (``dlrm predict``).

The rows go through the preprocessing readers (the same chunks, parsers, checks and
rejects) and are encoded with the training dataset's vocabularies or hash buckets and
dense statistics (``dlrm.serve.export``), so a row scores exactly as it would after
``preprocess --like`` and ``score``. Chunks are scored by a pool of processes, each with
its own copy of the model, and written in input order as they complete, so memory is a
few chunks' rows whatever the input's size.

Output (Parquet): ``source`` (the input's name), ``line`` (1-based line of the row in its
file, counted as the rejects count it; a Parquet file's row number), ``prob`` (a
regression label: ``prediction``) and ``label``. Rejected rows go to
``OUT.rejects.tsv`` as ``source<TAB>line<TAB>reason<TAB>text``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from dlrm.data.batches import Rows, table_rows, to_batch
from dlrm.metrics import sigmoid
from dlrm.rows.blocks import Block
from dlrm.rows.chunks import Options, Task, plan_tasks
from dlrm.rows.encode import encode
from dlrm.rows.inputs import check_inputs, layout_of, read_header
from dlrm.rows.layout import Layout
from dlrm.rows.like import schema_of
from dlrm.rows.rejects import one_line
from dlrm.rows.vocab import Encoder
from dlrm.schema.declared import Schema
from dlrm.schema.integrity import WRITE
from dlrm.schema.joins import based
from dlrm.serve.model_dir import TABLES, Exported, load_exported
from dlrm.utils.files import atomic_path
from dlrm.utils.workers import worker_pool

BATCH = 4096  # rows per forward pass


class Scorer:
    """Blocks of raw rows (parsed by ``layout``) → the model's outputs."""

    def __init__(self, exported: Exported, layout: Layout) -> None:
        self.exported, self.layout = exported, layout
        self.features = exported.features
        tables = exported.path / TABLES
        self.encoder = Encoder(layout.sparse, layout.encodings,
                               str(tables) if tables.is_dir() else None)
        self.regression = self.features.label_kind == "regression"

    def score(self, block: Block) -> tuple[np.ndarray, np.ndarray]:
        """(labels, outputs: click probabilities, or predicted values) of a block's rows."""
        return self.score_table(self.encode(block))

    def encode(self, block: Block) -> pa.Table:
        """A block's rows as the training dataset holds them (ids, transformed dense)."""
        return encode(block, self.encoder, self.layout)

    def score_table(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """(labels, outputs) of rows laid out as the training dataset holds them."""
        rows = self.rows_of(table)
        return rows.labels, self.outputs(rows)

    def rows_of(self, table: pa.Table) -> Rows:
        """Rows laid out as the training dataset holds them, as the model reads them."""
        return table_rows(table, self.features, self.layout.multi, "input")

    def outputs(self, rows: Rows) -> np.ndarray:
        """The model's outputs of rows as the model reads them."""
        outputs = []
        with torch.no_grad():
            for start in range(0, len(rows), BATCH):
                batch = to_batch(rows.slice(start, start + BATCH), self.features.sparse)
                out = self.exported.model.model(batch.dense_features, batch.sparse_features)
                outputs.append(out.reshape(-1).numpy())
        raw = np.concatenate(outputs) if outputs else np.zeros(0, np.float32)
        if not self.regression:
            return sigmoid(raw).astype(np.float32)
        bounds = self.exported.info.get("prediction_range")  # None: exported unclipped
        return raw if bounds is None else np.clip(raw, *bounds)


def layout_for(exported: Exported, paths: list[Path] | None) -> Layout:
    """The preprocessing layout of the model's training data, for these inputs (labeled
    or not, as the first shows); None: for rows that come as JSON (no files, no time
    column: it is no feature)."""
    schema = schema_of(exported.manifest)
    schema = dataclasses.replace(schema, joins=based(schema.joins, exported.path))
    if paths is None:
        schema = dataclasses.replace(schema, time=None)
    if paths and not _labeled(schema, paths[0]):
        schema = dataclasses.replace(
            schema, labeled=False, columns=tuple(c for c in schema.columns if c != schema.label))
    return layout_of(schema, None, paths or [], same_columns=False)


def _labeled(schema: Schema, path: Path) -> bool:
    """Whether a file holds the label column: by its header or Parquet schema, else by its
    first line's number of fields (one fewer than the schema's columns: no label)."""
    if schema.format == "parquet":
        return schema.label in pq.read_schema(path).names
    if schema.header:
        return schema.label in read_header(path, schema.delimiter)
    first = read_header(path, schema.delimiter)  # the first line's fields, read alike
    return len(first) != len(schema.columns) - 1


def score_chunk(task: Task, opts: Options, scorer: Scorer) -> dict[str, Any]:
    """One chunk's outputs with their chunk-relative line numbers, and its rejects."""
    labels, outputs, rejects, lines = [], [], [], 0
    header = scorer.layout.schema.header
    for block in scorer.layout.blocks(task, opts, lambda n: None):
        rejects += block.rejects
        lines = block.lines
        if block.label.size:
            y, p = scorer.score(block)
            labels.append(y)
            outputs.append(p)
    # Every line of the chunk is a row, a reject or the file's header, in order.
    taken = np.ones(max([lines, *(r.line for r in rejects)]) + 1, bool)
    taken[0] = False
    taken[[r.line for r in rejects]] = False
    if header and task.start == 0:
        taken[1] = False
    empty = np.zeros(0, np.float32)
    return {"line": np.flatnonzero(taken), "lines": lines,
            "label": np.concatenate(labels) if labels else empty,
            "output": np.concatenate(outputs) if outputs else empty,
            "rejects": [(r.line, r.reason, r.text) for r in rejects]}


_WORKER: dict[str, Any] = {}


def _init_worker(model_dir: str, paths: list[str]) -> None:
    torch.set_num_threads(1)
    exported = load_exported(model_dir)
    _WORKER["scorer"] = Scorer(exported, layout_for(exported, [Path(p) for p in paths]))


def _score_in_worker(task: Task, opts: Options) -> dict[str, Any]:
    return score_chunk(task, opts, _WORKER["scorer"])


def _in_order(tasks: list[Task], opts: Options, exported: Exported, paths: list[Path],
              workers: int) -> Iterator[tuple[Task, dict[str, Any]]]:
    """Each task's result in task order; at most two per worker in flight."""
    model = str(exported.path)
    if workers <= 1:
        scorer = Scorer(exported, layout_for(exported, paths))
        for t in tasks:
            yield t, score_chunk(t, opts, scorer)
        return
    with worker_pool(workers, _init_worker, (model, [str(p) for p in paths])) as pool:
        pending: deque[tuple[Task, Future]] = deque()
        queue = iter(tasks)
        for t in queue:
            pending.append((t, pool.submit(_score_in_worker, t, opts)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            t, fut = pending.popleft()
            result = fut.result()
            nxt = next(queue, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_score_in_worker, nxt, opts)))
            yield t, result


def predict(model: str | Path, inputs: list[str | Path], out: str | Path, workers: int = 0,
            options: Options | None = None) -> dict[str, Any]:
    """Scores every row of ``inputs`` (the model's schema's format) into ``out``
    (Parquet, written atomically); returns a summary. Raises ExportError for a bad model
    directory and PreprocessError for unreadable inputs or a header that does not fit."""
    t0 = time.time()
    opts = options or Options(workers=workers)
    paths = [Path(p) for p in inputs]
    check_inputs(paths, None)
    exported = load_exported(model)  # checks the directory before any worker starts
    layout = layout_for(exported, paths)
    regression = exported.features.label_kind == "regression"
    labeled = layout.schema.labeled
    tasks = plan_tasks(paths, opts.chunk_bytes,
                       whole=layout.schema.format == "parquet")
    workers = min(opts.workers or os.cpu_count() or 1, len(tasks))
    schema = pa.schema([("source", pa.string()), ("line", pa.int64()),
                        ("prediction" if regression else "prob", pa.float32())]
                       + ([("label", pa.float32() if regression else pa.int8())]
                          if labeled else []))
    bar = tqdm(total=sum(p.stat().st_size for p in paths), unit="B", unit_scale=True,
               desc="predict", dynamic_ncols=True) if os.isatty(1) else None
    out = Path(out)
    rows, reasons = 0, Counter()
    offsets: Counter[str] = Counter()  # per source: lines of its chunks so far
    rejects_path = out.with_name(out.name + ".rejects.tsv")
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, schema, **WRITE) as writer, \
            atomic_path(rejects_path) as tmp_rejects, open(tmp_rejects, "wb") as bad:
        for task, got in _in_order(tasks, opts, exported, paths, workers):
            base = offsets[task.source]
            n = got["output"].size
            columns = [pa.array([task.source] * n, pa.string()), pa.array(got["line"] + base),
                       pa.array(got["output"], pa.float32())]
            if labeled:
                columns.append(pa.array(got["label"].astype(np.float32 if regression
                                                            else np.int8)))
            writer.write_table(pa.table(columns, schema=schema))
            for line, reason, text in got["rejects"]:
                reasons[reason] += 1
                bad.write(b"%s\t%d\t%s\t%s\n" % (task.source.encode(), line + base,
                                                 reason.encode(), one_line(text)))
            offsets[task.source] += got["lines"]
            rows += n
            if bar is not None:
                bar.update(task.bytes)
    if bar is not None:
        bar.close()
    seconds = time.time() - t0
    summary = {"event": "predict", "rows": rows, "rejected": sum(reasons.values()),
               "rejected_by_reason": dict(sorted(reasons.items())), "out": str(out),
               "rejects": str(rejects_path), "seconds": round(seconds, 3),
               "rows_per_sec": round(rows / max(seconds, 1e-9), 1), "workers": workers}
    return summary

"""The per-chunk work of the two passes, run in the worker processes.

Pass 1 (vocab encoding only): a chunk's rejects, staged rows, summary and, last, its
value counts (by Arrow's hash table). Pass 2: its Parquet shards, then its done record,
last. Each output is written atomically, so a rerun redoes exactly the chunks whose last
output is missing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dlrm.preprocess.shards import PeriodShards, Shards, remove_stale
from dlrm.preprocess.staging import (
    IPC_OPTIONS,
    read_staged,
    stage_batch,
    staged_paths,
    staged_schema,
)
from dlrm.preprocess.vocab_merge import mark_counted, write_run
from dlrm.preprocess.vocab_rows import RECOUNT, row_mask, save_times
from dlrm.rows.blocks import Block, with_rejects
from dlrm.rows.chunks import Options, Task
from dlrm.rows.encode import encode
from dlrm.rows.layout import Layout
from dlrm.rows.vocab import Encoder, compact
from dlrm.schema.features import MISSING_ID, OOV_ID
from dlrm.utils.files import atomic_path, atomic_write_json
from dlrm.utils.heap import release_freed_memory

WORK = "_work"  # in-progress state; removed once the manifest is written


def _counted(block: Block, layout: Layout,
             rows: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(feature, values to count) of the block's vocab-encoded features; of the ``rows``
    (a mask) only, where given."""
    for f, (values, mask) in enumerate(block.hex):
        if layout.encodings[f].type != "vocab":
            continue
        if layout.multi[f]:  # mask: each row's bag length
            yield f, values if rows is None else values[np.repeat(rows, mask)]
        else:
            yield f, values[mask if rows is None else mask & rows]


SPILL = 4  # counting spills a run of counts once they hold a quarter of its budget


class _Counter:
    """A chunk's per-feature value counts, spilled as a sorted run whenever they outgrow
    ``budget`` / SPILL bytes; ``finish`` writes, last, the runs' index (the mark that the
    chunk's counts are complete)."""

    def __init__(self, work: Path, key: str, layout: Layout, budget: int) -> None:
        self.work, self.key, self.layout, self.budget = work, key, layout, budget
        self.parts: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in layout.sparse]
        self.runs: list[dict[str, list[int]]] = []

    def _spill(self) -> None:
        layout = self.layout
        self.runs.append(write_run(self.work, self.key, len(self.runs), {
            c: compact(p) for c, p, enc in zip(layout.sparse, self.parts, layout.encodings,
                                               strict=True) if enc.type == "vocab"}))
        for p in self.parts:
            p.clear()

    def count(self, block: Block, rows: np.ndarray | None = None) -> None:
        parts = self.parts
        for f, values in _counted(block, self.layout, rows):
            parts[f].append(value_counts(values))
            if len(parts[f]) >= 16:  # keep memory at the chunk's distinct values
                parts[f] = [compact(parts[f])]
        if SPILL * sum(v.nbytes + n.nbytes for p in parts for v, n in p) > self.budget:
            self._spill()

    def finish(self) -> None:
        if any(self.parts) or not self.runs:
            self._spill()
        mark_counted(self.work, self.key, self.runs)
        release_freed_memory()  # the chunk's counts: the merge that follows needs the room


def _times(block: Block) -> np.ndarray:
    """Each row's time, 0 without a time column (rows are then ordered by input alone)."""
    return block.time if block.time is not None else np.zeros(block.label.size, np.int64)


def count_chunk(task: Task, opts: Options, work: str, layout: Layout, stage: bool,
                budget: int, counted: frozenset[str], progress: Any) -> None:
    """Pass 1 for one chunk: where it ``stage``s, its rejects, staged rows and summary;
    its rows' times (``vocab_rows``); then, if it is one of those ``counted``, its
    per-feature value counts; last, the counts' mark (empty if it counts nothing).
    Without staging, the second pass reads the text again and finds the rejects."""
    work_dir = Path(work)
    counts = task.key in counted
    staged, summary_path = staged_paths(work_dir, task)
    counter = _Counter(work_dir, task.key, layout, budget)
    summary: dict[str, Any] = {}
    report = Progress(progress)
    times, rows = [], 0  # the rows' times where the schema has a time column, else their number

    def count(block: Block) -> None:
        nonlocal rows
        rows += block.label.size
        if block.time is not None:
            times.append(block.time)
        if counts:
            counter.count(block)

    if stage:
        blocks = with_rejects(layout.blocks(task, opts, report),
                              work_dir / "rejects" / f"{task.key}.tsv", summary)
        with atomic_path(staged) as tmp, pa.ipc.new_file(str(tmp), staged_schema(layout),
                                                         options=IPC_OPTIONS) as writer:
            for block in blocks:
                writer.write_batch(stage_batch(block, layout))
                count(block)
        atomic_write_json(summary_path, summary)
    else:
        for block in layout.blocks(task, opts, report):
            count(block)
    save_times(work_dir, task.key, np.concatenate(times) if times else
               np.zeros(0, np.int64) if layout.time else None, rows)
    counter.finish()
    report.flush()


def recount_chunk(job: tuple[Task, list[Any]], opts: Options, work: str, layout: Layout,
                  staged: bool, budget: int, progress: Any) -> None:
    """A chunk across a bound of the counted rows, counted again: only its rows inside
    ``ranges`` (``job``: the chunk and its ranges, see ``vocab_rows.row_mask``), from its
    staged rows or its text, as the counts ``KEY.vocab``."""
    task, ranges = job
    work_dir = Path(work)
    counter = _Counter(work_dir, f"{task.key}.{RECOUNT}", layout, budget)
    blocks = (read_staged(staged_paths(work_dir, task)[0], layout) if staged
              else layout.blocks(task, opts, lambda n: None))
    bounds = [tuple(map(tuple, r)) for r in ranges]  # as select made them (JSON-safe lists)
    seen: dict[int, int] = {}
    for block in blocks:
        counter.count(block, row_mask(_times(block), seen, bounds))
    counter.finish()


def value_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values, their counts), by Arrow's hash table: no sort."""
    counted = pc.value_counts(pa.array(values))
    return (counted.field("values").to_numpy(),
            counted.field("counts").to_numpy().astype(np.int64))


def out_of_vocabulary(batch: pa.Table, layout: Layout) -> np.ndarray:
    """Per categorical feature of an encoded batch: (ids not missing, ids out of
    vocabulary); zeros for a hashed one, which has no vocabulary."""
    counts = np.zeros((len(layout.sparse), 2), np.int64)
    for f, (c, enc) in enumerate(zip(layout.sparse, layout.encodings, strict=True)):
        if enc.type != "vocab":
            continue
        ids = batch.column(c)
        if layout.multi[f]:
            ids = pc.list_flatten(ids)
        counts[f] = (pc.sum(pc.not_equal(ids, MISSING_ID)).as_py() or 0,
                     pc.sum(pc.equal(ids, OOV_ID)).as_py() or 0)
    return counts


def write_chunk(task: Task, opts: Options, out: str, encoder: Encoder, layout: Layout,
                counted: bool, progress: Any) -> None:
    """The encoding pass for one chunk: its shards (by source, or by time period), then
    (reading the text here, unless a counting pass staged the rows) its rejects, then its
    done record, last. Staged rows are dropped once the chunk is done."""
    out_dir, work = Path(out), Path(out) / WORK
    if layout.time is None:
        shard_dir = out_dir / "data" / task.source
        shard_dir.mkdir(parents=True, exist_ok=True)
        prefix = f"part-{task.index:05d}"
        remove_stale(shard_dir, prefix)
        shards: Shards | PeriodShards = Shards(out_dir, shard_dir, prefix, layout)
    else:
        shards = PeriodShards(out_dir, f"{task.source}-{task.index:05d}", layout)
    summary: dict[str, Any] = {}
    staged, summary_path = staged_paths(work, task)
    report = Progress(progress)
    if counted:  # pass 1 staged the rows
        summary = json.loads(summary_path.read_text())
        blocks = read_staged(staged, layout)
    else:
        blocks = with_rejects(layout.blocks(task, opts, report),
                              work / "rejects" / f"{task.key}.tsv", summary)
    oov = np.zeros((len(layout.sparse), 2), np.int64)  # per feature: values, out of vocab
    for block in blocks:
        batch = encode(block, encoder, layout)
        oov += out_of_vocabulary(batch, layout)
        if layout.time is None:
            shards.write(batch)
        else:
            shards.write(batch, block.time)
    shards.close()
    if counted:  # the bar counts input bytes, here the chunk's
        report(task.bytes)
    report.flush()
    files = shards.files
    sums = ({"dense_sums": shards.sums.tolist()} if layout.time is None
            else {"dense_sums_by_period": shards.sums_by_period()})
    accepted = sum(f["rows"] for f in files)
    rejected = sum(summary["rejected_by_reason"].values())
    atomic_write_json(work / "done" / f"{task.key}.json", {
        "task": asdict(task), "rows_accepted": accepted, "rows_rejected": rejected,
        "rejected_by_reason": summary["rejected_by_reason"], "files": files,
        "lines": summary["lines"], "oov": oov.tolist(), **sums,
        **({"unmatched": summary["unmatched"]} if "unmatched" in summary else {}),
    })
    staged.unlink(missing_ok=True)


class Progress:
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

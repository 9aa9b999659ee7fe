"""Parsed rows staged between the vocab encoding's two passes (Arrow IPC, LZ4).

The first pass writes each chunk's parsed rows here (Criteo's: about 40% of the TSV's
size); the second reads them back instead of parsing the text again. Raw categorical
values are uint64: Criteo's with a bitmask of which are present, a declared schema's
missing ones as nulls and its bags as lists; a time column as int64 seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from dlrm.rows.blocks import Block, bag_array
from dlrm.rows.chunks import Task
from dlrm.rows.layout import Layout
from dlrm.schema.features import DENSE_NAMES, LABEL, SPARSE_NAMES

STAGED_SCHEMA = pa.schema(
    [(LABEL, pa.int8())]
    + [(c, pa.float32()) for c in DENSE_NAMES]
    + [(c, pa.uint64()) for c in SPARSE_NAMES]
    + [("present", pa.uint32())]  # bit f: feature f has a value
)
IPC_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")


def staged_paths(work: Path, task: Task) -> tuple[Path, Path]:
    """The chunk's staged rows and its summary (lines read, rejects by reason)."""
    return work / "staged" / f"{task.key}.arrow", work / "staged" / f"{task.key}.json"


def staged_schema(layout: Layout) -> pa.Schema:
    if layout.criteo_tsv:
        return STAGED_SCHEMA
    label = pa.float32() if layout.regression else pa.int8()
    return pa.schema([(layout.label, label)] + [(c, pa.float32()) for c in layout.dense]
                     + [(c, pa.list_(pa.uint64()) if m else pa.uint64())
                        for c, m in zip(layout.sparse, layout.multi, strict=True)]
                     + ([(layout.time.column, pa.int64())] if layout.time else []))


def stage_batch(block: Block, layout: Layout) -> pa.RecordBatch:
    arrays = [pa.array(block.label)] + [pa.array(x) for x in block.dense]
    if layout.criteo_tsv:
        present = np.zeros(block.label.size, np.uint32)
        for f, (_, p) in enumerate(block.hex):
            present |= p.astype(np.uint32) << np.uint32(f)
        arrays += [pa.array(v) for v, _ in block.hex] + [pa.array(present)]
        return pa.RecordBatch.from_arrays(arrays, schema=STAGED_SCHEMA)
    for (values, mask), multi in zip(block.hex, layout.multi, strict=True):
        if multi:  # mask: each row's bag length
            arrays.append(bag_array(values, mask))
        else:
            arrays.append(pa.array(values, mask=~mask))
    if layout.time:
        arrays.append(pa.array(block.time))
    return pa.RecordBatch.from_arrays(arrays, schema=staged_schema(layout))


def read_staged(path: Path, layout: Layout) -> Iterator[Block]:
    with pa.memory_map(str(path)) as source, pa.ipc.open_file(source) as reader:
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            if layout.criteo_tsv:
                cols = [c.to_numpy() for c in batch.columns]
                present = cols[-1]
                hex_ = [(cols[1 + len(DENSE_NAMES) + f], (present >> np.uint32(f)) & 1 == 1)
                        for f in range(len(SPARSE_NAMES))]
                yield Block(cols[0], cols[1:1 + len(DENSE_NAMES)], hex_, [], 0)
                continue
            n = len(layout.dense)
            hex_ = []
            for f, multi in enumerate(layout.multi):
                col = batch.column(1 + n + f)
                if multi:
                    hex_.append((col.flatten().to_numpy(),
                                 np.diff(col.offsets.to_numpy()).astype(np.int32)))
                else:
                    hex_.append((col.fill_null(0).to_numpy(),
                                 col.is_valid().to_numpy(zero_copy_only=False)))
            time = batch.column(batch.num_columns - 1).to_numpy() if layout.time else None
            yield Block(batch.column(0).to_numpy(),
                        [batch.column(1 + j).to_numpy() for j in range(n)], hex_, [], 0, time)

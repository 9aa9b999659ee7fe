"""Parsed rows staged between the vocab encoding's two passes (Arrow IPC, LZ4).

The first pass writes each chunk's parsed rows here (about 40% of the TSV's size); the
second reads them back instead of parsing the TSV again. Raw categorical values are
uint64; which are present is a bitmask.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from dlrm.data.blocks import Block
from dlrm.data.chunks import Task
from dlrm.data.schema import DENSE_NAMES, LABEL, SPARSE_NAMES

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


def stage_batch(block: Block) -> pa.RecordBatch:
    present = np.zeros(block.label.size, np.uint32)
    for f, (_, p) in enumerate(block.hex):
        present |= p.astype(np.uint32) << np.uint32(f)
    arrays = [pa.array(block.label)] + [pa.array(x) for x in block.dense]
    arrays += [pa.array(v) for v, _ in block.hex] + [pa.array(present)]
    return pa.RecordBatch.from_arrays(arrays, schema=STAGED_SCHEMA)


def read_staged(path: Path) -> Iterator[Block]:
    with pa.memory_map(str(path)) as source, pa.ipc.open_file(source) as reader:
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            cols = [c.to_numpy() for c in batch.columns]
            present = cols[-1]
            hex_ = [(cols[1 + len(DENSE_NAMES) + f], (present >> np.uint32(f)) & 1 == 1)
                    for f in range(len(SPARSE_NAMES))]
            yield Block(cols[0], cols[1:1 + len(DENSE_NAMES)], hex_, [], 0)

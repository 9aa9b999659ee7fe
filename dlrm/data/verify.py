"""``dlrm verify DATASET``: every file of a dataset checked against its manifest.

Each shard the manifest lists must exist with the size it records, read whole with every
page checksum verified, hold the rows it records, and hold ids inside each feature's table
(the manifest's cardinalities). A problem is reported per file and the check goes on, so
one run names every bad file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dlrm.errors import DataError
from dlrm.schema.integrity import check_column_ids, open_parquet, read_row_group
from dlrm.schema.manifest import Manifest


def _check_file(path: Path, entry: dict[str, Any], sparse: list[str],
                cardinalities: list[int]) -> int:
    """The file's rows, every page read; raises DataError at its first problem."""
    file = open_parquet(path, entry.get("bytes"))
    rows = 0
    with file:
        for g in range(file.metadata.num_row_groups):
            table = read_row_group(file, path, g, use_threads=False)
            for name, size in zip(sparse, cardinalities, strict=True):
                check_column_ids(table.column(name), size, name, path, rows)
            rows += table.num_rows
    if rows != entry["rows"]:
        raise DataError(f"{path}: {rows} rows, the manifest records {entry['rows']}")
    return rows


def verify_dataset(dataset: str | Path, manifest: Manifest,
                   log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Checks every shard of ``dataset``; returns ``{"files", "rows", "bad": [messages]}``."""
    dataset = Path(dataset)
    sparse = list(manifest.features.sparse)
    cardinalities = list(manifest.id_limits)
    entries = manifest.files
    if entries and "bytes" not in entries[0]:
        log(f"verify: {dataset} was written before shards carried checksums and sizes; "
            "a flipped byte cannot be found in it (preprocess it again)")
    bad, rows = [], 0
    bar = tqdm(entries, unit="file", desc="verify", dynamic_ncols=True) if os.isatty(1) else None
    for entry in bar if bar is not None else entries:
        try:
            rows += _check_file(dataset / entry["path"], entry, sparse, cardinalities)
        except DataError as e:
            bad.append(str(e))
            log(f"verify: {e}")
    if bar is not None:
        bar.close()
    return {"files": len(entries), "rows": rows, "bad": bad}

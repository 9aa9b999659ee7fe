"""The periods of a dataset with a time column, assembled from its chunks' shards.

Each chunk wrote its rows of each period to ``data/<period>/`` (``shards``). A period whose
files, taken in input order (source, chunk, shard), are already in time order (a log
written as time went by: Avazu's) is kept as it is. Any other period is read whole, sorted
by time (stably: rows of the same second keep their input order) and written again as
``data/<period>/sorted-<k>.parquet``; its memory is one period's rows. A sorted period is
recorded (``_work/periods/<name>.json``) before its unsorted files are removed, so an
interrupted run resumes here without sorting it twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dlrm.preprocess.shards import Shards, remove_stale
from dlrm.rows.layout import Layout
from dlrm.schema.integrity import read_table
from dlrm.schema.periods import period_keys
from dlrm.utils.files import atomic_write_json

SORTED = "sorted"


def assemble_periods(dones: list[dict[str, Any]], out: Path, work: Path, layout: Layout,
                     log: Callable[[str], Any]) -> tuple[list[dict[str, Any]],
                                                         dict[str, np.ndarray]]:
    """The manifest's ``periods`` (in time order, each with its rows in time order) and
    each period's dense sums, from the done records of every chunk in input order."""
    by_period: dict[str, list[dict[str, Any]]] = {}
    sums: dict[str, np.ndarray] = {}
    for done in dones:
        for f in done["files"]:
            by_period.setdefault(f["period"], []).append(f)
        for name, s in done["dense_sums_by_period"].items():
            sums[name] = sums.get(name, 0) + np.asarray(s).reshape(-1, 3)

    def start(name: str) -> int:
        return int(period_keys(np.array([by_period[name][0]["first"]]), layout.time.period)[0])

    periods = []
    for name in sorted(by_period, key=start):
        files = by_period[name]
        ordered = all(f["ordered"] for f in files) and all(
            a["last"] <= b["first"] for a, b in zip(files, files[1:], strict=False))
        if not ordered:
            files = _sorted(name, files, out, work, layout, log)
        periods.append({
            "name": name, "rows_accepted": sum(f["rows"] for f in files),
            "first": min(f["first"] for f in files), "last": max(f["last"] for f in files),
            "files": [{"path": f["path"], "rows": f["rows"], "bytes": f.get("bytes")}
                      for f in files],
        })
    return periods, {p["name"]: sums[p["name"]] for p in periods}


def _sorted(name: str, files: list[dict[str, Any]], out: Path, work: Path, layout: Layout,
            log: Callable[[str], Any]) -> list[dict[str, Any]]:
    record = work / "periods" / f"{name}.json"
    if record.exists():
        written = json.loads(record.read_text())
    else:
        directory = out / "data" / name
        remove_stale(directory, SORTED)
        schema = layout.output_schema()
        table = pa.concat_tables([read_table(out / f["path"], f.get("bytes")).cast(schema)
                                  for f in files])
        log(f"preprocess: period {name} is not in time order; sorting its "
            f"{table.num_rows} rows")
        table = table.take(pc.sort_indices(table, [(layout.time.column, "ascending")]))
        shards = Shards(out, directory, SORTED, layout)
        shards.write(table)
        shards.close()
        written = shards.files
        record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(record, written)
    for f in files:
        (out / f["path"]).unlink(missing_ok=True)
    return written

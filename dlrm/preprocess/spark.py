"""``dlrm preprocess --engine spark``: the same units of work, run as Apache Spark tasks.

Each chunk's write pass (parse, checks, rejects, shards, done record: ``passes.write_chunk``)
is one Spark task, so a cluster's executors do the reading and writing and Spark retries a
task that fails; a retried or rerun chunk rewrites its own files and its done record comes
last, by atomic rename, as on one host. The driver plans the chunks and writes the manifest
last, as on one host, so the dataset is the same file for file.

Input and output must be on storage that the driver and every executor see under the same
path (a shared file system in production; a local path with ``local[N]``).

The vocab encoding's counting pass is one Spark task per chunk as well (parse, checks,
staging and its local counts, as on one host, spilled as sorted runs). The runs are then
written as Parquet (one task per run) and read as one DataFrame, summed by Spark's shuffle
(``groupBy(feature, value)``), filtered by each feature's ``min_frequency`` and sorted by
(feature, count descending, value ascending); the driver reads the sorted values, takes at
most ``max_vocab`` of each feature, and writes the vocabularies and lookup tables as one
host does. Spark has no unsigned 64-bit integer: a value travels as the signed integer of
the same bits, and sorts by those bits with the sign bit flipped, which is the unsigned
order. ``--like``, ``--grow`` and ``--memory-gib`` are refused by name until their Spark
stage exists.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dlrm.errors import PreprocessError
from dlrm.preprocess.vocab_merge import runs_of, vocab_path, write_vocabulary
from dlrm.rows.layout import Layout
from dlrm.rows.vocab import table_paths
from dlrm.utils.files import atomic_path

COUNTED = "spark_counts"  # the work directory's counts as Parquet, which Spark reads
SORTED = "spark_vocab"  # and its sum, sorted, as Spark writes it
COUNTS = pa.schema([("feature", pa.string()), ("value", pa.int64()), ("count", pa.int64())])
SIGN = -(1 << 63)  # XOR with it: a uint64's bits, as int64, sort in unsigned order
BATCH = 1 << 20  # counted entries per Arrow batch written for Spark
ENTRIES = 1 << 22  # counted entries per partition of Spark's sums


def _call(fn: Callable, args: tuple) -> Callable[[Any], None]:
    def run(task: Any) -> None:
        fn(task, *args, None)  # no progress bar in an executor

    return run


class SparkPool:
    """``Pool``'s ``run`` over a SparkSession: one Spark task per unit (``master``: Spark's
    master URL, ``conf``: ``key=value`` settings for the session)."""

    def __init__(self, master: str, conf: list[str]) -> None:
        try:
            from pyspark.sql import SparkSession
        except ImportError:
            raise PreprocessError("--engine spark needs PySpark: pip install 'dlrm[spark]'"
                                  ) from None
        # Executors run this interpreter (the venv's), where dlrm is importable.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        builder = SparkSession.builder.master(master).appName("dlrm preprocess")
        builder = builder.config("spark.ui.enabled", "false").config(
            "spark.ui.showConsoleProgress", "false")
        for item in conf:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise PreprocessError(f"--spark-conf: expected key=value, got {item!r}")
            builder = builder.config(key, value)
        self.session, self.conf = builder.getOrCreate(), conf
        self.master = self.session.sparkContext.master

    def __enter__(self) -> SparkPool:
        return self

    def __exit__(self, *exc: object) -> None:
        pass  # the session outlives a run: a caller's (a test module's) own to stop

    def run(self, fn: Callable, tasks: list, args: tuple, progress: bool = False) -> None:
        """Runs ``fn(task, *args, None)`` for every task as one Spark task each; a task that
        fails past Spark's retries fails the run here, with its error."""
        if not tasks:
            return
        sc = self.session.sparkContext
        sc.setJobDescription(f"dlrm preprocess: {fn.__name__}")  # as the Spark UI names it
        rdd = sc.parallelize(tasks, len(tasks))
        try:
            rdd.foreach(_call(fn, args))
        except Exception as e:  # Py4J's error: the executor's traceback is in it
            detail = str(e).splitlines()
            cause = next((line for line in reversed(detail) if "Error" in line), detail[-1])
            raise PreprocessError(f"a Spark task failed: {cause.strip()}") from None


    def merge_vocabularies(self, run: Callable, keys: list[str], work: Path, layout: Layout,
                           budget: int, log: Callable[[str], Any], parent: Path | None = None
                           ) -> dict[str, np.ndarray]:
        """``vocab_merge.merge_vocabularies`` by Spark's shuffle: every vocab feature's
        vocabulary (mapped from its file) and lookup table from the counts of the chunks
        ``keys``. A feature whose table exists (a resumed run) is not merged again."""
        from pyspark.sql import functions as F

        if parent is not None:
            raise PreprocessError("--engine spark: --grow is not built for Spark yet")
        encodings = {c: e for c, e in zip(layout.sparse, layout.encodings, strict=True)
                     if e.type == "vocab"}
        todo = [c for c in encodings if not table_paths(work / "tables", c)[1].exists()]
        if todo:
            runs = [(str(work), k, r) for k in keys for r in range(len(runs_of(work, k)))]
            log(f"preprocess: Spark sums the counts ({len(runs)} runs of {len(keys)} chunks) "
                f"of {len(todo)} features")
            counted = work / COUNTED
            self.run(_export_run, [r for r in runs if not _exported(*r).exists()],
                     (todo,))
            log("preprocess: the counts exported as Parquet; Spark sums them")
            counts = self.session.read.parquet(*(str(_exported(*r)) for r in runs))
            if not any(c.startswith("spark.sql.shuffle.partitions=") for c in self.conf):
                # Spark's default (200) costs more than the sums on small inputs: a
                # partition per 4M counted entries, at least one per core.
                entries = sum(e - s for k in keys for spans in runs_of(work, k)
                              for c, (s, e) in spans.items() if c in todo)
                self.session.conf.set("spark.sql.shuffle.partitions", max(
                    self.session.sparkContext.defaultParallelism, -(-entries // ENTRIES)))
            least = F.create_map(*[F.lit(x) for c in todo
                                   for x in (c, encodings[c].min_frequency)])
            summed = counts.groupBy("feature", "value").agg(F.sum("count").alias("count"))
            out = work / SORTED
            self.session.sparkContext.setJobDescription("dlrm preprocess: sum_and_sort")
            (summed.where(F.col("count") >= least[F.col("feature")])
             .orderBy("feature", F.desc("count"), F.col("value").bitwiseXOR(F.lit(SIGN)))
             .write.mode("overwrite").parquet(str(out)))
            log("preprocess: Spark summed and sorted the counts; writing the vocabularies")
            _write_vocabularies(out, todo, encodings, work, budget)
            shutil.rmtree(out)
            shutil.rmtree(counted)
        return {c: np.load(vocab_path(work, c), mmap_mode="r") for c in encodings}


def _exported(work: str, key: str, run: int) -> Path:
    return Path(work) / COUNTED / f"{key}.{run}.parquet"


def _export_run(job: tuple[str, str, int], features: list[str], progress: Any) -> None:
    """A Spark task: one run of a chunk's counts (``job``: work, key, run) as a Parquet file
    of (feature, value, count), values as the int64 of their bits, written atomically."""
    work, key, run = job
    stem, spans = Path(work) / "counts" / f"{key}.{run}", runs_of(Path(work), key)[run]
    values = np.load(f"{stem}.values.npy", mmap_mode="r")
    counts = np.load(f"{stem}.counts.npy", mmap_mode="r")
    path = _exported(work, key, run)
    path.parent.mkdir(exist_ok=True)
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, COUNTS) as out:
        for c in features:
            start, end = spans[c]
            for i in range(start, end, BATCH):
                j = min(end, i + BATCH)
                out.write_batch(pa.RecordBatch.from_arrays(
                    [pa.array([c] * (j - i), pa.string()),
                     pa.array(np.asarray(values[i:j]).view(np.int64)),
                     pa.array(np.asarray(counts[i:j], np.int64))], schema=COUNTS))


def _write_vocabularies(sorted_dir: Path, features: list[str], encodings: dict[str, Any],
                        work: Path, budget: int) -> None:
    """Each feature's vocabulary from Spark's sorted output (its part files in partition
    order), checked to be in vocabulary order, capped at ``max_vocab``."""
    parts = sorted(sorted_dir.glob("part-*.parquet"))
    table = (pa.concat_tables([pq.read_table(p) for p in parts]) if parts
             else COUNTS.empty_table())
    for c in features:
        mine = table.filter(pc.equal(table.column("feature"), c))
        v = mine.column("value").to_numpy().view(np.uint64)
        n = mine.column("count").to_numpy()
        if not np.all((n[1:] < n[:-1]) | ((n[1:] == n[:-1]) & (v[1:] > v[:-1]))):
            raise PreprocessError(f"{sorted_dir}: Spark's sorted counts of {c} are out of "
                                  "order; preprocess again")
        cap = encodings[c].max_vocab
        write_vocabulary(work, c, v[:cap] if cap else v, budget)


def check_spark_options(like: bool, grow: bool, memory_gib: float) -> None:
    """What ``--engine spark`` does not run yet, refused by name."""
    for given, name in ((grow, "--grow"), (like, "--like"), (bool(memory_gib), "--memory-gib")):
        if given:
            raise PreprocessError(f"--engine spark: {name} is not built for Spark yet; use "
                                  "the local engine")

"""``dlrm preprocess --engine spark``: the same units of work, run as Apache Spark tasks.

Each chunk's write pass (parse, checks, rejects, shards, done record: ``passes.write_chunk``)
is one Spark task, so a cluster's executors do the reading and writing and Spark retries a
task that fails; a retried or rerun chunk rewrites its own files and its done record comes
last, by atomic rename, as on one host. The driver plans the chunks and writes the manifest
last, as on one host, so the dataset is the same file for file.

Input and output must be on storage that the driver and every executor see under the same
path (a shared file system in production; a local path with ``local[N]``).

Built so far: the encodings without a counting pass (``hash``, ``managed``). The vocab
encoding's counts, ``--like``, ``--grow`` and ``--memory-gib`` are refused by name until
their Spark stage exists (the counts are to be summed by Spark's shuffle).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from dlrm.errors import PreprocessError


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
        self.session = builder.getOrCreate()
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
        rdd = self.session.sparkContext.parallelize(tasks, len(tasks))
        try:
            rdd.foreach(_call(fn, args))
        except Exception as e:  # Py4J's error: the executor's traceback is in it
            detail = str(e).splitlines()
            cause = next((line for line in reversed(detail) if "Error" in line), detail[-1])
            raise PreprocessError(f"a Spark task failed: {cause.strip()}") from None


def check_spark_options(encodings: list[str], like: bool, grow: bool,
                        memory_gib: float) -> None:
    """What ``--engine spark`` does not run yet, refused by name."""
    if "vocab" in encodings:
        raise PreprocessError("--engine spark: the vocab encoding's counting pass is not "
                              "built for Spark yet; use --encoding hash (or a schema's hash "
                              "or managed features), or the local engine")
    for given, name in ((like, "--like"), (grow, "--grow"), (bool(memory_gib), "--memory-gib")):
        if given:
            raise PreprocessError(f"--engine spark: {name} is not built for Spark yet; use "
                                  "the local engine")

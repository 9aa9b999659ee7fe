"""Click logs (Criteo TSV, or any declared schema) → Parquet shards + manifest.json:
parallel, streaming, resumable.

Work is cut into *chunks*: byte ranges of plain files (a chunk owns the lines that start
inside its range), whole files for gzip (a stream cannot be entered in the middle).
``workers`` processes take chunks from a queue. Each chunk is read in blocks of
``block_bytes`` and never held whole, so a worker's memory is a few blocks plus, for the
vocab pass, the distinct values its chunk has seen: bounded by block size and vocabulary,
not by file size.

Each block's fields are split by pyarrow's CSV reader (as raw bytes) and then checked
and converted by whole-array numpy operations on each column's bytes: no Python per row.

1. ``vocab`` encoding only: every chunk is validated and transformed, its parsed rows
   staged (Arrow IPC, LZ4) and each categorical value counted per feature; the counts of
   the training rows (``vocab_rows``: ``--vocab-from``, the chunks across a bound counted
   again, ``counting`` drives it) are merged exactly, in partitions that keep each worker
   within its share of ``Options.memory_gib`` (``vocab_merge``); each feature's
   vocabulary is the values seen at least ``min_frequency`` times, by descending count
   (ties by value), capped at ``max_vocab``, and is turned into a hash table.
2. Every chunk is written as Parquet shards: ``hash`` validates and transforms it here,
   ``vocab`` reads its staged rows back and looks the ids up in the hash tables.

Dense features: missing → 0, negative → 0, then ``log1p``, stored as float32 (done once
here, so training and evaluation read the same numbers). Categorical features: hex →
uint64 → id, integers all the way (int64 in Parquet); ids follow ``schema.MISSING_ID`` /
``schema.OOV_ID``. Bad rows are counted by reason and written to ``rejects/<source>.tsv``
as ``line<TAB>reason<TAB>text``; the good rows around them are kept.

The pieces, one job each: ``inputs`` (checks, headers, layout), ``chunks`` (cutting inputs,
reading a chunk's lines), ``criteo_tsv`` / ``declared_reader`` with ``codecs`` (parsing
and converting columns), ``rejects``, ``like`` (another dataset's encoding), ``staging``
(rows kept between the two passes), ``vocab`` (ids), ``vocab_merge`` (counts into
vocabularies within a memory budget), ``passes`` (what a worker does for
one chunk in each pass), ``shards`` (writing them, by time period where the schema has a
time column), ``timeline`` (a time column's periods, sorted where they came out of
order) and ``manifest`` (what it records, and reading it back); this module drives them:
``_Run`` holds one run's inputs and decisions, and reads top to bottom (``finished``: a
complete dataset already there; ``begin``: resume or start; ``execute``: the passes;
``finish``: the rejects, the periods and the manifest).

One writer: a run holds ``out``'s lock (``writer_lock``) throughout, and a second run into
the same directory is refused, naming the first. Workers die with the run (``workers``).

Resumable: a chunk's outputs are final once its done record is written (last, by atomic
rename), and a rerun skips chunks that have one, so killing the process at any moment
and rerunning the same command gives the same dataset. ``manifest.json`` is written last,
atomically, once every file it lists is found with its recorded size: a dataset is
complete iff it exists.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dlrm.errors import DataError, PreprocessError
from dlrm.preprocess.counting import count_values
from dlrm.preprocess.disk import choose_staging
from dlrm.preprocess.passes import WORK, write_chunk
from dlrm.preprocess.pool import Pool
from dlrm.preprocess.record import (
    fingerprint,
    growth,
    joins_record,
    oov_rates,
    same_vocab_rows,
    schema_json,
    standardize,
)
from dlrm.preprocess.spark import SparkPool, check_spark_options
from dlrm.preprocess.timeline import assemble_periods
from dlrm.preprocess.vocab_merge import TABLES, budget_bytes, merge_vocabularies
from dlrm.preprocess.vocab_rows import Selection, check_units
from dlrm.rows.chunks import Options, Task, plan_tasks, source_name
from dlrm.rows.inputs import check_inputs, layout_of
from dlrm.rows.layout import Layout
from dlrm.rows.like import VOCAB, Reference
from dlrm.rows.vocab import Encoder, Encoding, save_tables
from dlrm.schema.declared import SCHEMAS, Schema, load_schema
from dlrm.schema.integrity import check_file
from dlrm.schema.manifest import FORMAT, MANIFEST, Manifest, load_manifest
from dlrm.utils.files import atomic_path, atomic_write_json, io_fault
from dlrm.utils.writer_lock import LOCK, writer_lock


def preprocess(inputs: list[str | Path], out: str | Path, workers: int = 0,
               encoding: Encoding | None = None, log: Callable[[str], Any] = print,
               options: Options | None = None, schema: Schema | None = None,
               like: str | Path | None = None,
               vocab_from: list[str] | None = None, grow: bool = False,
               spark: tuple[str, list[str]] | None = None) -> Manifest:
    """Preprocesses ``inputs`` into the dataset directory ``out``; returns its manifest.

    ``schema``: the layout of the inputs (default: ``configs/schemas/criteo.toml``);
    ``encoding``, when given, is every categorical feature's. ``like``: a dataset whose
    schema, encoding, vocabularies and dense statistics are applied instead (see
    ``dlrm.rows.like``); nothing is counted, unless ``grow``: then its vocabularies are
    extended by the values the inputs' counted rows hold ``min_frequency`` times, with
    ids after the old ones (old ids never move; see ``vocab_merge.order_feature``).
    ``vocab_from``: the rows the vocabularies are counted on, as split sources (default:
    the default split's training rows; see ``dlrm.preprocess.vocab_rows``); every other
    value is out of vocabulary. ``spark``: ``(master, conf)``: run the units as Spark tasks
    (``--engine spark``; see ``dlrm.preprocess.spark``).

    A rerun over a complete dataset made from the same (unchanged) inputs with the same
    encoding returns its manifest without redoing anything; a rerun over an interrupted
    one finishes it, redoing only the chunks that had not completed.

    Raises:
        PreprocessError: missing or unreadable input, clashing source names, an output
            directory that holds something else, or a write that failed (full disk).
    """
    t0 = time.time()
    opts = options or Options(workers=workers)
    if opts.memory_gib < 0:
        raise PreprocessError(f"--memory-gib must be above 0 (or 0: a quarter of the host's "
                              f"memory), got {opts.memory_gib}")
    paths = [Path(p) for p in inputs]
    ref = None
    if like is not None:
        if schema is not None or encoding is not None:
            raise PreprocessError("--like takes the schema and encoding of its dataset; "
                                  "give no other")
        ref = Reference.of(like, load_manifest(like))
        schema = ref.schema
        if grow and ref.vocab_sha256 is None:
            raise PreprocessError(f"--grow: {like} has no vocabularies to grow (its features "
                                  "are hashed or managed)")
        if vocab_from is not None and not grow:
            raise PreprocessError("--like takes the vocabularies of its dataset, counted on "
                                  "its rows; --vocab-from has nothing to count (unless "
                                  "--grow)")
    elif grow:
        raise PreprocessError("--grow extends the vocabularies of a dataset: give it as "
                              "--like DATASET")
    check_inputs(paths, encoding)
    layout = layout_of(schema or load_schema(SCHEMAS / "criteo.toml"), encoding, paths)
    if spark is not None:
        check_spark_options(like is not None, grow, opts.memory_gib)
    run = _Run(paths, Path(out), opts, layout, ref, vocab_from, log, t0, grow, spark)
    with writer_lock(run.out, PreprocessError, "dlrm preprocess"):
        done = run.finished()
        if done is not None:
            return done
        try:
            run.begin()
            return run.execute()
        except OSError as e:
            raise PreprocessError(f"writing under {run.out} failed: {io_fault(e, run.out)}"
                                  ) from None


@dataclass
class _Run:
    """One run over ``paths`` into ``out``, its inputs and encoding decided; ``stage``
    (whether the counting pass stages the parsed rows) is decided by :meth:`begin`."""

    paths: list[Path]
    out: Path
    opts: Options
    layout: Layout
    ref: Reference | None  # --like
    vocab_from: list[str] | None
    log: Callable[[str], Any]
    t0: float
    grow: bool  # --grow: ref's vocabularies extended by the inputs' counted rows
    spark: tuple[str, list[str]] | None  # --engine spark: (master, conf)
    stage: bool = False
    engine: dict[str, Any] | None = None  # the manifest's record of a Spark run

    @property
    def work(self) -> Path:
        return self.out / WORK

    @property
    def counts(self) -> bool:
        """Whether a first pass counts the values (vocab encoding, not --like unless
        --grow)."""
        return bool(self.layout.vocab and (self.ref is None or self.grow))

    def plan(self) -> dict[str, Any]:
        """What makes the dataset what it is: a rerun or a resumed run must match it."""
        plan = {"format": FORMAT, "encoding": self.layout.encoding_json(),
                "sources": [fingerprint(p) for p in self.paths]}
        if not self.layout.criteo_tsv:  # Criteo's records no declaration (see record.py)
            plan["schema"] = self.layout.schema.to_json()
        if self.grow:
            plan["grown_from"] = {"dataset": str(self.ref.path),
                                  "vocab_sha256": self.ref.vocab_sha256}
        elif self.ref is not None:
            plan["like"] = self.ref.to_json()
        if self.counts:
            plan["vocab_from"] = self.vocab_from
        return plan

    def finished(self) -> Manifest | None:
        """The manifest of ``out`` if it already holds this dataset (None: it holds no
        complete one); PreprocessError if it holds another."""
        if not (self.out / MANIFEST).exists():
            return None
        old, plan = load_manifest(self.out), self.plan()
        same = (old.encoding == plan["encoding"]
                and old.declared == plan.get("schema")
                and old.like == plan.get("like")
                and ({k: old.grown_from[k] for k in ("dataset", "vocab_sha256")}
                     if old.grown_from else None) == plan.get("grown_from")
                and same_vocab_rows(old.vocab_from, plan)
                and [{k: s[k] for k in ("path", "bytes", "mtime_ns")} for s in old.sources]
                == plan["sources"])
        if not same:
            raise PreprocessError(f"{self.out} already holds another dataset "
                                  f"({self.out / MANIFEST}); choose another --out")
        self.log(f"preprocess: {self.out} already holds this dataset; nothing to do")
        return old

    def begin(self) -> None:
        """Resumes the unfinished run in ``out`` (the same plan), or starts in an empty
        directory; PreprocessError for anything else there."""
        plan_path = self.work / "plan.json"
        if plan_path.exists():
            old = json.loads(plan_path.read_text())
            if {k: v for k, v in old.items() if k != "stage"} != self.plan():
                raise PreprocessError(f"{self.out} holds an unfinished run over other inputs "
                                      f"or another encoding ({plan_path}); choose another "
                                      "--out or delete it")
            self.log(f"preprocess: resuming the unfinished run in {self.out}")
            self.stage = old.get("stage", True)  # as it began
        elif any(p.name not in (LOCK, WORK) for p in self.out.iterdir()):
            raise PreprocessError(f"{self.out} is not empty and holds no dlrm dataset; choose "
                                  "another --out")
        else:
            # A run killed before its plan was written had done nothing yet.
            shutil.rmtree(self.work, ignore_errors=True)
            self.stage = choose_staging(self.paths, self.layout, self.out,
                                        self.counts and self.opts.stage, self.log)
        # First: a _work without it holds nothing.
        atomic_write_json(plan_path, {**self.plan(), "stage": self.stage})

    def execute(self) -> Manifest:
        """Both passes, then the manifest; returns it."""
        out, work, opts, layout, ref, log = (self.out, self.work, self.opts, self.layout,
                                             self.ref, self.log)
        for sub in ("counts", "staged", "rejects", "done"):
            (work / sub).mkdir(parents=True, exist_ok=True)
        tasks = plan_tasks(self.paths, opts.chunk_bytes,
                           whole=layout.schema.format == "parquet")
        # Largest first: the pool's tail is then short.
        by_size = sorted(tasks, key=lambda t: -t.bytes)
        workers = min(opts.workers or os.cpu_count() or 1, len(tasks))
        total = sum(p.stat().st_size for p in self.paths)
        staged = self.counts and self.stage  # the counting pass stages the parsed rows
        if self.spark is not None:
            runner: Any = SparkPool(*self.spark)
            self.engine = {"name": "spark", "master": runner.master}
        else:
            runner = Pool(workers, total * (2 if self.counts else 1))
        with runner as pool:
            tables = work / TABLES if layout.vocab else None
            vocabs: dict[str, np.ndarray] = {}
            selection, record = None, None
            if ref is not None and layout.vocab and not self.grow:
                vocabs = ref.vocabs()
                record = {"like": str(ref.path), **ref.vocab_from}
                save_tables(vocabs, tables)
            elif layout.vocab:
                budget = budget_bytes(opts.memory_gib) // workers
                vocabs, selection = count_values(
                    pool.run, tasks, by_size, work, layout, self.vocab_from, opts, staged,
                    budget, log, ref.path / VOCAB if self.grow else None,
                    pool.merge_vocabularies if self.spark is not None else merge_vocabularies)
                record = selection.record
            if vocabs:
                with atomic_path(out / VOCAB) as tmp:
                    if not self.counts:  # the same bytes, so that its checksum still matches
                        shutil.copyfile(ref.path / VOCAB, tmp)
                    else:
                        np.savez(tmp, **vocabs)
            cardinalities = [int(vocabs[c].size) + 2 if c in vocabs else e.rows
                             for c, e in zip(layout.sparse, layout.encodings, strict=True)]
            del vocabs  # mapped files (or, --like, arrays) the workers look up on their own
            todo = [t for t in by_size if not (work / "done" / f"{t.key}.json").exists()]
            encoder = Encoder(layout.sparse, layout.encodings, str(tables) if tables else None)
            log(f"preprocess: writing the shards of {len(todo)} chunks")
            pool.run(write_chunk, todo, (opts, str(out), encoder, layout, staged), progress=True)

        log("preprocess: assembling the rejects and the manifest")
        manifest = self.finish(tasks, cardinalities, record, selection)
        read = manifest.rows_accepted + manifest.rows_rejected
        log(f"preprocess: {read} rows read, {manifest.rows_accepted} accepted, "
            f"{manifest.rows_rejected} rejected {manifest.rejected_by_reason} "
            f"in {manifest.seconds:.1f}s -> {out}")
        return manifest

    def finish(self, tasks: list[Task], cardinalities: list[int],
               vocab_from: dict[str, Any] | None, selection: Selection | None) -> Manifest:
        """Per-source rejects with file-wide line numbers, the periods of a time column,
        then the manifest (``vocab_from``: the rows the vocabularies were counted on, among
        the units ``selection`` saw, which must be the dataset's), then cleanup."""
        paths, out, work, layout, ref, log = (self.paths, self.out, self.work, self.layout,
                                              self.ref, self.log)
        sources = []
        sums: dict[str, np.ndarray] = {}  # per source: each dense feature's rows, sum, squares
        dones = []  # every chunk's record, in input order
        (out / "rejects").mkdir(exist_ok=True)
        for p in paths:
            name = source_name(p)
            chunks = [t for t in tasks if t.source == name]
            reasons: Counter[str] = Counter()
            files, offset = [], 0
            sums[name] = np.zeros((len(layout.dense), 3))
            with atomic_path(out / "rejects" / f"{name}.tsv") as tmp, open(tmp, "wb") as merged:
                for t in sorted(chunks, key=lambda t: t.index):
                    done = json.loads((work / "done" / f"{t.key}.json").read_text())
                    dones.append(done)
                    reasons.update(done["rejected_by_reason"])
                    if "dense_sums" in done:  # an older version's record has none
                        sums[name] += np.asarray(done["dense_sums"]).reshape(-1, 3)
                    files += done["files"]
                    with open(work / "rejects" / f"{t.key}.tsv", "rb") as part:
                        for line in part:
                            number, rest = line.split(b"\t", 1)
                            merged.write(b"%d\t%s" % (int(number) + offset, rest))
                    offset += done["lines"]
            accepted, rejected = sum(f["rows"] for f in files), sum(reasons.values())
            sources.append({
                "name": name, **fingerprint(p), "rows_read": accepted + rejected,
                "rows_accepted": accepted, "rows_rejected": rejected,
                "rejected_by_reason": dict(sorted(reasons.items())),
                **({} if layout.time else {"files": files}),
            })
        periods = None
        if layout.time:  # the rows are laid out by period, which the splits then name
            periods, sums = assemble_periods(dones, out, work, layout, log)
        reasons = Counter()
        for s in sources:
            reasons.update(s["rejected_by_reason"])
        stats = ref.standardize if ref is not None else standardize(layout, sums)
        manifest = {
            "format": FORMAT,
            "schema": schema_json(layout) | ({"standardize": stats} if stats else {}),
            "encoding": layout.encoding_json(),
            **({"like": ref.to_json()} if ref is not None and not self.grow else {}),
            **({"grown_from": ref.grown_json(growth(layout, ref, cardinalities))}
               if self.grow else {}),
            "cardinalities": cardinalities,
            "oov_rate": oov_rates(layout, dones),
            **({"joins": joins_record(layout, dones)}
               if layout.schema.joins else {}),
            **({"vocab_from": vocab_from} if vocab_from is not None else {}),
            "sources": sources,
            **({"periods": periods} if periods is not None else {}),
            "rows_accepted": sum(s["rows_accepted"] for s in sources),
            "rows_rejected": sum(s["rows_rejected"] for s in sources),
            "rejected_by_reason": dict(sorted(reasons.items())),
            **({"engine": self.engine} if self.engine is not None else {}),
            "seconds": round(time.time() - self.t0, 3),
        }
        # As it is read back: checked as every reader's is.
        written = Manifest.from_json(json.loads(json.dumps(manifest)), out / MANIFEST)
        if selection is not None:  # before the dataset is complete, not after
            check_units(selection, written.units)
        for f in written.files:
            try:
                check_file(out / f["path"], f.get("bytes"))
            except DataError as e:
                raise PreprocessError(f"{e}: something else wrote into {out} during this run; "
                                      "preprocess again into an empty directory") from None
        atomic_write_json(out / MANIFEST, manifest)
        shutil.rmtree(work, ignore_errors=True)
        return written

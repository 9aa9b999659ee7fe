"""The counting stage of a vocab-encoded dataset: pass 1 over every chunk (staging its rows
and counting its values), the choice of the rows the vocabularies count (``vocab_rows``),
a second count of the chunks across a bound, then the merge into vocabularies
(``vocab_merge``). Each step skips what an interrupted run already finished."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dlrm.errors import PreprocessError
from dlrm.preprocess.passes import count_chunk, recount_chunk
from dlrm.preprocess.staging import staged_paths
from dlrm.preprocess.vocab_merge import counts_mark, merge_vocabularies
from dlrm.preprocess.vocab_rows import RECOUNT, Selection, counts_source, select, times_path
from dlrm.rows.chunks import Options, Task
from dlrm.rows.layout import Layout

Run = Callable[..., None]  # run(fn, jobs, args, progress=False): fn(job, *args, updates) each


def count_values(run: Run, tasks: list[Task], by_size: list[Task], work: Path, layout: Layout,
                 specs: list[str] | None, opts: Options, staged: bool, budget: int,
                 log: Callable[[str], Any], parent: Path | None = None,
                 merge: Callable[..., dict[str, np.ndarray]] = merge_vocabularies
                 ) -> tuple[dict[str, np.ndarray], Selection]:
    """Every vocab feature's vocabulary, counted on the rows ``specs`` name (None: the
    default split's training rows), and the selection that says which those were;
    ``parent`` (``--grow``): the vocabularies file they extend; ``merge``: what sums the
    counts into vocabularies (``merge_vocabularies``'s signature: on this host, or Spark's).
    ``tasks`` in input order, ``by_size`` as the pool should take them."""
    # A chunk is counted once its counts exist; its staged rows are needed until
    # the chunk is written (an unfinished run of an older version had none).
    todo = [t for t in by_size if not (
        counts_mark(work, t.key).exists() and times_path(work, t.key).exists()
        and (not staged or (work / "done" / f"{t.key}.json").exists()
             or staged_paths(work, t)[0].exists()))]
    counted = frozenset(t.key for t in tasks if counts_source(specs, layout, t))
    log(f"preprocess: counting the values of {len(todo)} chunks"
        f"{' (staging their rows)' if staged else ''}")
    run(count_chunk, todo, (opts, str(work), layout, staged, budget, counted), True)
    try:
        selection = select(work, tasks, layout, specs, counted)
    except ValueError as e:
        raise PreprocessError(str(e)) from None
    record = selection.record
    if not record["rows_counted"]:  # a tiny input: its default training rows
        log(f"preprocess: warning: --vocab-from {' '.join(record['specs'])} names no "
            "rows: every value is out of vocabulary")
    again = [(t, selection.partial[t.key]) for t in by_size if t.key in selection.partial
             and not counts_mark(work, f"{t.key}.{RECOUNT}").exists()]
    log(f"preprocess: vocabularies from {record['rows_counted']} rows "
        f"({' '.join(record['specs'])}); {len(selection.partial)} chunks hold rows "
        "on both sides and are counted again")
    run(recount_chunk, again, (opts, str(work), layout, staged, budget))
    vocabs = merge(run, selection.keys(), work, layout, budget, log, parent)
    return vocabs, selection

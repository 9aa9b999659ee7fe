"""Ranking metrics of a checkpoint (``dlrm evaluate --ranking``), for a schema whose
``[roles]`` name the user's and the item's features: how well it would serve
``dlrm recommend``.

For every user with a relevant row in the split (a click; a rating at least
``relevant``), the model scores candidate items for them: every distinct item of the
training rows (``candidates`` 0), or their relevant items and ``candidates`` items
sampled from the rest (a stated, seeded protocol). A candidate row is the user's first
row of the split with its item features replaced by the candidate's, so a new user (out of
vocabulary) is scored by their side features. Items the user has rows of in training are
left out of their ranking. Recall@K and NDCG@K (torchmetrics, users without a relevant
candidate skipped) are then averaged over the users.

The candidate rows are written to a scratch Parquet file under the run directory and
scored like any split, on any number of ranks.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchmetrics.retrieval import RetrievalNormalizedDCG, RetrievalRecall

from dlrm.data.loader import ParquetBatches
from dlrm.rows.like import schema_of
from dlrm.schema.integrity import WRITE, read_table
from dlrm.schema.splits import Segment, resolve_split
from dlrm.serve.model_dir import items_of_dataset
from dlrm.serve.recommend import user_with_items
from dlrm.train.dist import barrier
from dlrm.train.evaluate import gather_predictions, predict
from dlrm.train.offline import Offline
from dlrm.utils.files import atomic_write_json

KS = (10, 20)
MAX_SCORES = 200_000_000  # candidate rows beyond which all-item ranking must be sampled


def ranking_metrics(scores: list[np.ndarray], relevant: list[np.ndarray],
                    ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Recall@K and NDCG@K averaged over users: ``scores[u]`` of user u's candidates,
    ``relevant[u]`` which of them are relevant (users without one are skipped)."""
    users = [u for u, r in enumerate(relevant) if r.any()]
    out: dict[str, float] = {"users": len(users)}
    if not users:
        return out | {f"{m}@{k}": float("nan") for k in ks for m in ("recall", "ndcg")}
    preds = torch.from_numpy(np.concatenate([scores[u] for u in users]).astype(np.float64))
    target = torch.from_numpy(np.concatenate([relevant[u] for u in users]))
    indexes = torch.from_numpy(np.repeat(np.arange(len(users)),
                                         [len(scores[u]) for u in users]))
    for k in ks:
        for name, metric in (("recall", RetrievalRecall), ("ndcg", RetrievalNormalizedDCG)):
            m = metric(top_k=k, empty_target_action="skip")
            out[f"{name}@{k}"] = float(m(preds, target, indexes=indexes))
    return out


def _user_groups(held: pa.Table, user: tuple[str, ...]) -> np.ndarray:
    """Each held row's user, as a number: its user key's id, or for a user out of
    vocabulary (all share one id) the ids of all its one-valued user features, the best
    the encoded rows keep of a new user's identity."""
    ids = held.column(user[0]).to_numpy()
    scalars = [c for c in user if not pa.types.is_list(held.schema.field(c).type)]
    fields = np.stack([held.column(c).to_numpy() for c in scalars], axis=1)
    fields[ids > 1, 1:] = 0
    return np.unique(fields, axis=0, return_inverse=True)[1].reshape(-1)


def _columns(table: pa.Table, names: list[str]) -> dict[str, np.ndarray]:
    return {c: table.column(c).to_numpy() for c in names}


def _read(segments: list[Segment], columns: list[str] | None = None) -> pa.Table:
    parts = [read_table(s.path, s.bytes, columns=columns).slice(s.start, s.stop - s.start)
             for s in segments]
    return pa.concat_tables(parts, promote_options="permissive")


def rank_checkpoint(checkpoint: str | Path, data: str | Path, split: str = "test",
                    ks: tuple[int, ...] = KS, candidates: int = 0, seed: int = 0,
                    relevant: float | None = None, out: str | Path | None = None,
                    batch_size: int = 0) -> dict[str, Any] | None:
    """The ranking report of ``split`` (see the module doc); rank 0 returns it and writes
    ``out`` (default ``RUN/eval/ranking-SPLIT.json``, which ``dlrm report`` shows)."""
    offline = Offline(checkpoint, data, split, batch_size)
    manifest, data = offline.manifest, Path(data)
    schema = schema_of(manifest)
    if not schema.user or not schema.item:
        raise ValueError(f"{data}: its schema {schema.name} names no [roles] user and item "
                         "features; ranking needs them")
    user_key, item_key = schema.user[0], schema.item[0]
    label = offline.features.label
    kind = offline.label_kind
    if relevant is None:
        relevant = 1.0 if kind == "binary" else 4.0
    specs = offline.split_specs
    items = items_of_dataset(data, manifest, schema, {}, specs["train"])
    item_ids = items.column(item_key).to_numpy()
    train = _columns(_read(resolve_split(data, manifest, specs["train"]), [user_key, item_key]),
                     [user_key, item_key])
    held = _read(offline.segments)
    held_users, held_items = (held.column(user_key).to_numpy(), held.column(item_key).to_numpy())
    who = _user_groups(held, schema.user)
    good = held.column(label).to_numpy() >= relevant
    # The relevant rows by user, in the order users first appear in the split.
    groups, first = np.unique(who, return_index=True)
    relevant_rows = np.flatnonzero(good)
    by_user = relevant_rows[np.argsort(who[relevant_rows], kind="stable")]
    starts = np.searchsorted(who[by_user], groups)
    ends = np.searchsorted(who[by_user], groups, side="right")
    # Each user's training items (out of vocabulary users share an id: nothing to leave out).
    order = np.argsort(train[user_key], kind="stable")
    tu, ti = train[user_key][order], train[item_key][order]
    rng = np.random.default_rng(seed)
    plan = []  # per user: (first held row, candidate item indexes, which are relevant)
    unreachable = 0
    for row, a, b in zip(first, starts, ends, strict=True):
        if a == b:  # nothing relevant: not ranked
            continue
        u = held_users[row]
        wanted = np.unique(held_items[by_user[a:b]])
        seen = ti[np.searchsorted(tu, u):np.searchsorted(tu, u, side="right")] if u > 1 \
            else np.zeros(0, np.int64)
        allowed = ~np.isin(item_ids, seen) | np.isin(item_ids, wanted)
        hit = np.isin(item_ids, wanted)
        unreachable += int(np.setdiff1d(wanted, item_ids).size)
        pool = np.flatnonzero(allowed)
        if candidates:
            rest = pool[~hit[pool]]
            pick = rng.choice(rest, size=min(candidates, rest.size), replace=False)
            pool = np.sort(np.concatenate([np.flatnonzero(hit & allowed), pick]))
        plan.append((int(row), pool, hit[pool]))
    total = sum(p[1].size for p in plan)
    if total > MAX_SCORES:
        raise ValueError(f"ranking every item for every user is {total} candidate rows; "
                         f"sample them with --ranking-candidates N (e.g. 100)")
    scratch = offline.checkpoint.parent.parent / "eval" / f".ranking-{split}"
    path = scratch / "candidates.parquet"
    if offline.dist.is_main:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        with pq.ParquetWriter(path, held.schema, **WRITE) as writer:
            for row, pool, _ in plan:
                piece = user_with_items(held.slice(row, 1), items.take(pa.array(pool)),
                                        schema.item).cast(held.schema)
                writer.write_table(piece, row_group_size=1 << 16)
    barrier()
    try:
        rows = pq.read_metadata(path).num_rows
        batches = ParquetBatches([Segment(path, 0, rows)], offline.batch_size,
                                 offline.dist.rank, offline.dist.world_size, pad=True,
                                 features=offline.features,
                                 cardinalities=offline.manifest.id_limits)
        got = gather_predictions(*predict(offline.model, batches, offline.dist.device))
    finally:
        barrier()
        if offline.dist.is_main:
            shutil.rmtree(scratch, ignore_errors=True)
    if got is None:
        return None
    _, logits = got
    ends = np.cumsum([p[1].size for p in plan])
    scores = np.split(logits, ends[:-1]) if plan else []
    metrics = ranking_metrics(scores, [p[2] for p in plan], ks)
    protocol = (f"all {item_ids.size} items of the training rows" if not candidates else
                f"each user's relevant items and {candidates} items sampled from the "
                f"{item_ids.size} of the training rows (seed {seed})")
    report = {"checkpoint": str(offline.checkpoint), "step": offline.step, "data": str(data),
              "split": split, "protocol": f"{protocol}; the user's training items left out",
              "relevant": (f"{label} positive" if kind == "binary" and relevant == 1
                           else f"{label} >= {relevant}"), "candidate_rows": int(total),
              "unrankable_relevant_items": unreachable, "metrics": metrics}
    target = Path(out) if out else offline.checkpoint.parent.parent / "eval" / \
        f"ranking-{split}.json"
    atomic_write_json(target, report)
    return report

"""Synthetic logs for any declared schema, labels from a planted click model.

Each categorical feature gets a vocabulary (sizes cycle through 10 … ``max_vocab``, so
some features are high-cardinality) with Zipf-like frequencies: a long tail of ids seen a
handful of times. The log-odds of a click are

    bias + sum_f w_f[id_f]                    (a bag: the mean of its ids' weights)
         + sum_j c_j * z_j                    (dense features, z standard normal)
         + gamma * sum_(f,g) <u_f[id_f], v_g[id_g]>   (up to 3 interacting pairs, rank 4)

with larger first-order weights on larger vocabularies, as real logs carry much of their
signal in user, ad and device ids (``signal="high"``; ``"low"``: on the smaller
vocabularies instead, ``"even"``: the same scale for all). ``interactions`` scales gamma
(0.5 by default; 0: no pairwise term), so the same schema yields datasets of different
shapes: where the signal sits, how long the rare-id tail is (``max_vocab``), how strong
the interactions are, and the seed. A label declared by a rule (``rating >= 4``) is written
as a number on the right side of the rule. A regression label is ``3 + 0.8 * (log-odds -
bias)`` plus normal noise of standard deviation ``NOISE``. A time column's day ``d`` holds
the ``d``-th period from 2014-10-21 (in the schema's period and format), in time order.
``truth.json`` holds the Bayes
AUC (regression: the irreducible RMSE, the noise's) of every day and of the held-out
halves of the last (the default validation and test splits), and for a binary label
their ``seen_oracle_auc``: what a model that knew every weight of the ids seen in
training, and nothing of the others, would reach (a bound on what any training on those
days can reach; see ``_seen_oracle``). Deterministic for a seed.
"""

from __future__ import annotations

import csv
import gzip
from pathlib import Path
from typing import Any

import numpy as np

from dlrm.metrics import auc
from dlrm.schema.declared import Schema, parse_rule
from dlrm.schema.features import holdout_halves
from dlrm.schema.periods import format_times, period_keys, period_start
from dlrm.utils.files import atomic_path, atomic_write_json

SIZES = (10, 100, 1000, 10_000, 100_000, 1_000_000)
ZIPF_EXPONENT = 1.05
LATENT_DIM = 4
BIAS = -1.0
NOISE = 0.6  # of a regression label
FIRST_DAY = 1_413_849_600  # 2014-10-21 00:00 UTC, where a time column's periods begin


SIGNALS = ("high", "low", "even")


class PlantedModel:
    """The click model of a schema: vocabularies, weights and interacting pairs."""

    def __init__(self, schema: Schema, max_vocab: int, seed: int, signal: str = "high",
                 interactions: float = 0.5) -> None:
        if signal not in SIGNALS:
            raise ValueError(f"signal must be one of {', '.join(SIGNALS)}, got {signal!r}")
        rng = np.random.default_rng([seed, 0])
        self.schema, self.gamma = schema, interactions
        n = len(schema.categorical)
        self.sizes = [min(max_vocab, SIZES[(2 + 5 * f) % len(SIZES)]) for f in range(n)]
        # More signal in larger vocabularies (or smaller, or the same); the total the same
        # however many features.
        spread = np.sqrt(7 / max(n, 7))
        digits = [np.log10(s) for s in self.sizes]
        weight = {"high": digits, "low": [7 - d for d in digits],
                  "even": [3.5] * n}[signal]
        self.scale = scale = [0.2 * w * spread for w in weight]  # of each feature's weights
        self.weights = [rng.normal(0, sc, size) for sc, size in zip(scale, self.sizes,
                                                                     strict=True)]
        ranks = [np.arange(1, size + 1, dtype=np.float64) ** -ZIPF_EXPONENT for size in self.sizes]
        self.cdf = [np.cumsum(r) / r.sum() for r in ranks]
        self.order = [rng.permutation(size) for size in self.sizes]  # frequent ≠ low id
        self.pairs = [(f, f + 1) for f in range(0, min(n - 1, 9), 3)]  # at most 3
        self.latent = {f: rng.normal(0, 0.5, (self.sizes[f], LATENT_DIM))
                       for pair in self.pairs for f in pair}
        self.dense_effect = rng.normal(0, 0.4, len(schema.dense))

    def draw(self, f: int, rng: np.random.Generator, n: int) -> np.ndarray:
        """n ids of feature f (0-based), Zipf-distributed over a shuffled vocabulary."""
        return self.order[f][np.searchsorted(self.cdf[f], rng.random(n))]


def _render_ids(ids: np.ndarray, f: int, kind: str) -> list[str]:
    """Ids as the text of a field: hex numbers, integers, or strings (by feature)."""
    if kind == "hex":
        return [f"{(int(i) * 2654435761 + f) & 0xFFFFFFFF:08x}" for i in ids]
    if f % 2 == 0:
        return [str(int(i) * 7 + 13) for i in ids]
    return [f"v{f}_{int(i):x}" for i in ids]


def _label_text(clicks: np.ndarray, rule: str, rng: np.random.Generator) -> list[str]:
    parsed = parse_rule(rule)
    if parsed is None:
        return [str(int(c)) for c in clicks]
    op, threshold = parsed
    yes = {">=": threshold, ">": threshold + 1, "<=": threshold, "<": threshold - 1,
           "==": threshold, "!=": threshold + 1}[op]
    no = {">=": threshold - 1, ">": threshold, "<=": threshold + 1, "<": threshold,
          "==": threshold + 1, "!=": threshold}[op]
    spread = rng.integers(0, 2, clicks.size)  # a little variety on each side of the rule
    step = 1 if op in (">=", ">", "!=") else -1
    return [f"{(yes + step * s) if c else (no - step * s):g}"
            for c, s in zip(clicks, spread, strict=True)]


def _times(schema: Schema, day: int, rows: int, rng: np.random.Generator) -> list[str]:
    """Times in the ``day``-th period, in order, as the time column's text."""
    period = schema.time.period
    key = int(period_keys(np.array([FIRST_DAY]), period)[0]) + day
    start, stop = period_start(key, period), period_start(key + 1, period)
    return format_times(np.sort(rng.integers(start, stop, rows)), schema.time.format)


def _day(model: PlantedModel, day: int, rows: int, rng: np.random.Generator,
         ) -> tuple[dict[str, list[str]], np.ndarray, np.ndarray, dict[str, Any]]:
    """One day's columns (as field text), labels and their truth: click probabilities, or
    for a regression label, the labels' expected values; and what was drawn (the row
    count, each feature's ids (a bag's first), each bag's first-order term, each dense
    feature's z and which fields are written)."""
    schema = model.schema
    logit = np.full(rows, BIAS)
    columns: dict[str, list[str]] = {}
    ids: dict[int, np.ndarray] = {}
    bag_terms: dict[int, np.ndarray] = {}  # per bag feature: its first-order term per row
    for f, c in enumerate(schema.categorical):
        if c.multi:
            cap = c.max_length or 4
            lengths = rng.integers(1, min(cap, 4) + 1, rows)
            flat = model.draw(f, rng, int(lengths.sum()))
            row = np.repeat(np.arange(rows), lengths)
            bag_terms[f] = np.bincount(row, model.weights[f][flat], rows) / lengths
            logit += bag_terms[f]
            text = _render_ids(flat, f, c.values)
            bounds = np.r_[0, np.cumsum(lengths)]
            columns[c.name] = [c.separator.join(text[a:b])
                               for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
            ids[f] = flat[bounds[:-1]]  # a bag's first id interacts
        else:
            drawn = model.draw(f, rng, rows)
            logit += model.weights[f][drawn]
            columns[c.name] = _render_ids(drawn, f, c.values)
            ids[f] = drawn
    for f, g in model.pairs:
        logit += model.gamma * np.einsum("nd,nd->n", model.latent[f][ids[f]],
                                         model.latent[g][ids[g]])
    drawn: dict[str, Any] = {"rows": rows, "ids": ids, "bag_terms": bag_terms, "z": [],
                             "present": []}
    for j, d in enumerate(schema.dense):
        z = rng.normal(0, 1, rows)
        logit += model.dense_effect[j] * z
        value = np.expm1(z + 1.5) if d.transform == "log1p" else z
        missing = rng.random(rows) < 0.1
        drawn["z"].append(z)
        drawn["present"].append(~missing)
        columns[d.name] = ["" if m else (str(int(round(v))) if d.values == "integer" else
                                         f"{v:.4f}") for v, m in zip(value, missing, strict=True)]
    if schema.kind == "regression":
        expected = 3 + 0.8 * (logit - BIAS)
        labels = expected + rng.normal(0, NOISE, rows)
        columns[schema.label] = [f"{v:.3f}" for v in labels]
        truth = expected
    else:
        truth = 1 / (1 + np.exp(-logit))
        labels = (rng.random(rows) < truth).astype(np.int8)
        columns[schema.label] = _label_text(labels, schema.rule, rng)
    for k, name in enumerate(schema.ignore):  # text with the delimiter in it, or row numbers
        columns[name] = ([f"note {i}, {k}" for i in range(rows)] if k % 2 == 0
                         else [str(10**9 + i) for i in range(rows)])
    if schema.time:
        columns[schema.time.column] = _times(schema, day, rows, rng)
    return columns, labels, truth, drawn


def _seen_oracle(model: PlantedModel, drawn: dict[str, Any], seen: dict[int, np.ndarray],
                 ) -> np.ndarray:
    """The logit of an oracle that knows the planted weights and latent vectors of every
    id the training days hold, and nothing of the others (their prior: 0), and the dense
    values where a field is written (bags: known whole). Any model trained on those days
    knows less, so its AUC bounds what training can reach; the rest of the gap to Bayes
    is the data's, not the recipe's."""
    logit = np.full(drawn["rows"], BIAS)
    ids, bags = drawn["ids"], drawn["bag_terms"]
    known = {f: np.ones(i.size, bool) if f in bags else seen[f][i] for f, i in ids.items()}
    for f, i in ids.items():
        logit += bags[f] if f in bags else model.weights[f][i] * known[f]
    for f, g in model.pairs:
        logit += model.gamma * known[f] * known[g] * np.einsum(
            "nd,nd->n", model.latent[f][ids[f]], model.latent[g][ids[g]])
    for j, (z, present) in enumerate(zip(drawn["z"], drawn["present"], strict=True)):
        logit += model.dense_effect[j] * z * present
    return logit


def _score(kind: str, labels: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    """What the best possible model scores on these rows: the Bayes AUC of the true click
    probabilities, or the RMSE of the expected values (the irreducible error)."""
    if kind == "regression":
        return {"irreducible_rmse": float(np.sqrt(np.mean((labels - expected) ** 2)))}
    return {"ctr": float(labels.mean()), "bayes_auc": auc(labels, expected)}


def synth_declared(schema: Schema, out: str | Path, days: int = 3, rows_per_day: int = 10_000,
                   seed: int = 0, max_vocab: int = 100_000, gzip_files: bool = False,
                   signal: str = "high", interactions: float = 0.5) -> dict[str, Any]:
    """Writes ``day_0 … day_{days-1}`` (``.csv`` / ``.tsv``) of ``schema`` under ``out``,
    with ``truth.json``; returns it."""
    if schema.format not in ("csv", "tsv"):
        raise ValueError(f"synth writes csv or tsv, not {schema.format}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = PlantedModel(schema, max_vocab, seed, signal, interactions)
    names = list(schema.columns) or [*schema.used(), *schema.ignore]
    truth: dict[str, Any] = {"schema": schema.name, "seed": seed, "max_vocab": max_vocab,
                             "signal": signal, "interactions": interactions, "days": {},
                             "splits": {}}
    suffix = f".{schema.format}" + (".gz" if gzip_files else "")
    seen: dict[int, np.ndarray] = {}  # per feature: which ids the training days hold
    for day in range(days):
        rng = np.random.default_rng([seed, 1, day])
        columns, labels, expected, drawn = _day(model, day, rows_per_day, rng)
        if day < days - 1:  # the default split's training days
            for f, i in drawn["ids"].items():
                if f not in drawn["bag_terms"]:
                    seen.setdefault(f, np.zeros(model.sizes[f], bool))[i] = True

        path = out / f"day_{day}{suffix}"
        with atomic_path(path) as tmp:
            with (gzip.open(tmp, "wt", newline="") if gzip_files
                  else open(tmp, "w", newline="")) as f:
                writer = csv.writer(f, delimiter=schema.delimiter, lineterminator="\n",
                                    quoting=csv.QUOTE_MINIMAL if schema.format == "csv"
                                    else csv.QUOTE_NONE, escapechar=None)
                if schema.header:
                    writer.writerow(names)
                writer.writerows(zip(*(columns[c] for c in names), strict=True))
        truth["days"][f"day_{day}"] = {"rows": rows_per_day,
                                       **_score(schema.kind, labels, expected)}
        if day == days - 1:
            oracle = (_seen_oracle(model, drawn, seen)
                      if schema.kind == "binary" and days > 1 else None)
            for split, (a, b) in zip(("val", "test"), holdout_halves(rows_per_day),
                                     strict=True):
                truth["splits"][split] = {"source": f"day_{day}", "rows": [a, b],
                                          **_score(schema.kind, labels[a:b], expected[a:b])}
                if oracle is not None:
                    truth["splits"][split]["seen_oracle_auc"] = auc(labels[a:b], oracle[a:b])
    atomic_write_json(out / "truth.json", truth)
    return truth

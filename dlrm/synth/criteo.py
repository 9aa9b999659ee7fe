"""Synthetic Criteo: day files in the real TSV format, labels from a planted click model.

The click model is what makes the data useful for checking a trainer: its log-odds are

    bias + sum_f w_f[id_f]                       (first-order effect of 14 categorical features)
         + sum_j c_j * z_j                       (dense features, z = standardised log1p)
         + gamma * sum_(f,g) <u_f[id_f], v_g[id_g]>   (pairwise interactions, rank 4)

so a model with feature interactions (DLRM's dot interaction) can approach the
Bayes-optimal AUC while a first-order model cannot. Each row's true click probability
is written beside the data (``truth/<day>.prob.npy``) and ``truth.json`` holds the
Bayes AUC of every day and of the held-out halves (see ``schema.holdout_halves``).

Categorical values follow Zipf-like frequencies over vocabularies shaped like Criteo
Kaggle's (capped at 100k), or (``growth``) with distinct counts that grow with the rows as
Criteo's do, rendered as eight hex digits; some features and dense
columns are often missing, and I2 has a few negatives, as in the real logs.
Deterministic for a given seed: day ``d`` depends only on ``(seed, d)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from dlrm.metrics import auc
from dlrm.schema.features import (
    DENSE_NAMES,
    LABEL,
    NUM_DENSE,
    NUM_SPARSE,
    SPARSE_NAMES,
    holdout_halves,
)
from dlrm.synth.drift import block, effects, new_ids
from dlrm.synth.growth import growing_values, grows
from dlrm.utils.files import atomic_path, atomic_write_json

VOCAB_SIZES = [1460, 583, 100000, 50000, 305, 24, 12517, 633, 3, 80000, 5683, 90000, 3194,
               27, 14992, 100000, 10, 5652, 2173, 4, 95000, 18, 15, 70000, 105, 40000]
CAT_MISSING = [0.0, 0.0, 0.03, 0.03, 0.0, 0.12, 0.0, 0.0, 0.0, 0.03, 0.0, 0.03, 0.0,
               0.0, 0.0, 0.03, 0.0, 0.0, 0.44, 0.44, 0.03, 0.0, 0.76, 0.03, 0.44, 0.44]
DENSE_MISSING = [0.45, 0.0, 0.21, 0.22, 0.03, 0.22, 0.04, 0.0, 0.04, 0.45, 0.04, 0.77, 0.22]
DENSE_LOG_MEAN = [0.8, 1.5, 2.0, 1.5, 7.5, 3.5, 1.6, 2.5, 3.8, 0.4, 1.0, 0.5, 1.8]
ZIPF_EXPONENT = 1.05
# Features whose ids carry a first-order effect, and pairs that interact.
FIRST_ORDER = [0, 1, 4, 5, 7, 8, 10, 12, 13, 16, 18, 21, 22, 24]
PAIRS = [(0, 1), (4, 7), (5, 13), (10, 12), (16, 21), (18, 24), (1, 22), (8, 19), (0, 24), (4, 13)]
LATENT_DIM = 4
FIRST_ORDER_SCALE = 0.35
INTERACTION_SCALE = 1.0
DENSE_EFFECT = {1: 0.25, 5: -0.2, 10: 0.2, 12: 0.15}
BIAS = -1.6


@dataclass
class ClickModel:
    """The planted model's parameters; a pure function of the seed."""

    first_order: list[np.ndarray]  # per feature: effect of each id (zeros when none)
    latent: list[np.ndarray | None]  # per feature: [V, LATENT_DIM] or None
    hex_salt: np.ndarray  # per feature: xor salt of the value rendering

    @classmethod
    def from_seed(cls, seed: int) -> ClickModel:
        rng = np.random.default_rng([seed, 1 << 20])
        first_order, latent = [], []
        in_pair = {f for pair in PAIRS for f in pair}
        for f, v in enumerate(VOCAB_SIZES):
            w = rng.normal(0.0, FIRST_ORDER_SCALE, v) if f in FIRST_ORDER else np.zeros(v)
            first_order.append(w)
            latent.append(rng.normal(0.0, 1.0 / np.sqrt(LATENT_DIM), (v, LATENT_DIM))
                          if f in in_pair else None)
        return cls(first_order, latent, rng.integers(0, 2**32, NUM_SPARSE, dtype=np.uint64))

    def hex_values(self, f: int, ids: np.ndarray) -> np.ndarray:
        """Ids as uint32 for hex rendering: a bijection, so distinct ids stay distinct."""
        x = (ids.astype(np.uint64) * np.uint64(2654435761) + self.hex_salt[f]) % np.uint64(2**32)
        return x


def _zipf_ids(rng: np.random.Generator, vocab: int, n: int) -> np.ndarray:
    cdf = np.cumsum(1.0 / np.arange(1, vocab + 1) ** ZIPF_EXPONENT)
    return np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1]), vocab - 1)


def generate_day(model: ClickModel, seed: int, day: int, rows: int, growth: bool = False,
                 drift: float = 0.0) -> tuple[pa.Table, np.ndarray]:
    """One day of rows as a Criteo-column table (strings for C*, nullable ints for I*).
    ``growth``: the features that grow draw values as ``synth_growth`` says (the click
    model reads each value modulo its vocabulary). ``drift``: new ids each day and
    effects that shift (``dlrm.synth.drift``)."""
    rng = np.random.default_rng([seed, day])
    logit = np.full(rows, BIAS)
    columns: dict[str, pa.Array] = {}

    dense = []
    for j in range(NUM_DENSE):
        x = np.floor(np.exp(rng.normal(DENSE_LOG_MEAN[j], 1.2, rows))).astype(np.int64) - 1
        x = np.maximum(x, 0)
        if j == 1:  # I2 holds a few small negatives, as in the real logs
            neg = rng.random(rows) < 0.03
            x[neg] = -rng.integers(1, 4, neg.sum())
        missing = rng.random(rows) < DENSE_MISSING[j]
        z = (np.log1p(np.maximum(x, 0)) - DENSE_LOG_MEAN[j]) / 1.2
        logit += DENSE_EFFECT.get(j, 0.0) * np.where(missing, 0.0, z)
        dense.append(pa.array(x, mask=missing))

    ids, values, present = [], [], []
    for f, vocab in enumerate(VOCAB_SIZES):
        if growth and grows(f):
            values.append(growing_values(rng, f, rows))
            i = (values[f] % np.uint64(vocab)).astype(np.int64)
        else:
            i = _zipf_ids(rng, vocab, rows)
            values.append(i)
        ok = rng.random(rows) >= CAT_MISSING[f]
        if drift and f in FIRST_ORDER:
            drifting = np.random.default_rng([seed, day, 5 << 20, f])
            zipf = _zipf_ids(drifting, block(vocab), rows)
            values[f] = new_ids(drifting, i, vocab, day, drift, zipf)
            effect = effects(seed, f, model.first_order[f], values[f], day, drift,
                             FIRST_ORDER_SCALE)
        else:
            effect = model.first_order[f][i]
        ids.append(i)
        present.append(ok)
        logit += np.where(ok, effect, 0.0)
    for f, g in PAIRS:
        u = model.latent[f][ids[f]]
        v = model.latent[g][ids[g]]
        both = present[f] & present[g]
        logit += INTERACTION_SCALE * np.where(both, np.einsum("nk,nk->n", u, v), 0.0)

    prob = 1.0 / (1.0 + np.exp(-logit))
    label = (rng.random(rows) < prob).astype(np.int8)
    columns[LABEL] = pa.array(label)
    for name, arr in zip(DENSE_NAMES, dense, strict=True):
        columns[name] = arr
    for f, name in enumerate(SPARSE_NAMES):
        hexes = _hex(model.hex_values(f, values[f]))
        columns[name] = pc.if_else(pa.array(present[f]), hexes, pa.scalar(None, pa.string()))
    return pa.table(columns), prob.astype(np.float32)


def _hex(values: np.ndarray) -> pa.Array:
    """uint32 values → hex strings, vectorised through a 2-byte lookup table."""
    digits = np.array(list("0123456789abcdef"))
    table = np.char.add(digits[:, None], digits[None, :]).ravel()  # 256 two-digit strings
    v = values.astype(np.uint32)
    parts = [table[(v >> np.uint32(s)) & np.uint32(0xFF)] for s in (24, 16, 8, 0)]
    out = np.char.add(np.char.add(parts[0], parts[1]), np.char.add(parts[2], parts[3]))
    return pa.array(out.astype(object), pa.string())


def write_tsv(table: pa.Table, path: Path) -> None:
    """Writes Criteo-format TSV (no header, empty = missing), atomically; `.gz` compresses."""
    compression = "gzip" if path.suffix == ".gz" else None
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    with atomic_path(path) as tmp, pa.output_stream(tmp, compression=compression) as sink:
        pacsv.write_csv(table, sink, options)


def synth(out: str | Path, days: int, rows_per_day: int, seed: int = 0,
          gzip: bool = False, growth: bool = False, drift: float = 0.0) -> dict:
    """Writes ``day_0 … day_{days-1}`` (``.gz`` if asked), their truth files and truth.json.
    ``growth``: distinct values grow with the rows as Criteo's do (``synth_growth``);
    ``drift``: new ids each day and effects that shift (``dlrm.synth.drift``).

    Returns the content of truth.json. A rerun with the same arguments over a complete
    output finds truth.json matching and returns without rewriting anything.
    """
    out = Path(out)
    params = {"days": days, "rows_per_day": rows_per_day, "seed": seed, "gzip": gzip,
              **({"growth": True} if growth else {}), **({"drift": drift} if drift else {})}
    truth_path = out / "truth.json"
    if truth_path.exists():
        done = json.loads(truth_path.read_text())
        if done.get("params") == params:
            return done
    (out / "truth").mkdir(parents=True, exist_ok=True)
    model = ClickModel.from_seed(seed)
    report: dict = {"params": params, "days": {}, "splits": {}}
    for day in range(days):
        table, prob = generate_day(model, seed, day, rows_per_day, growth, drift)
        name = f"day_{day}"
        write_tsv(table, out / (name + (".gz" if gzip else "")))
        np.save(out / "truth" / f"{name}.prob.npy", prob)
        labels = table.column(LABEL).to_numpy()
        report["days"][name] = {"rows": rows_per_day, "ctr": float(labels.mean()),
                                "bayes_auc": auc(labels, prob)}
        if day == days - 1:
            for split, (a, b) in zip(("val", "test"), holdout_halves(rows_per_day), strict=True):
                report["splits"][split] = {"source": name, "rows": [a, b],
                                           "bayes_auc": auc(labels[a:b], prob[a:b])}
    atomic_write_json(truth_path, report)
    return report

"""Drift for the planted Criteo log (``dlrm synth --drift RATE``): a log that changes day
by day, as the daily loop of incremental training meets it.

In every feature with a first-order effect:
- **New ids each day.** On day ``d`` a ``RATE`` share of rows takes an id new that day,
  and as many one of the day before's new ids (a new item is still popular the next
  day): ids past the feature's vocabulary, ``BLOCK`` of them per day, Zipf-distributed,
  each with an effect of its own, stronger than the old ids' (new items carry signal).
- **Effects that shift.** Each old id's effect takes a random walk: every day adds
  ``RATE × FIRST_ORDER_SCALE`` times a standard normal step.

Everything is a pure function of ``(seed, feature, day)``.
"""

from __future__ import annotations

import numpy as np

NEW_EFFECT_SCALE = 0.7  # std of a new id's effect (the old ids': FIRST_ORDER_SCALE)


def block(vocab: int) -> int:
    """How many new ids a feature of ``vocab`` old ones gains each day."""
    return max(8, vocab // 20)


def new_ids(rng: np.random.Generator, ids: np.ndarray, vocab: int, day: int, rate: float,
            zipf: np.ndarray) -> np.ndarray:
    """``ids`` (a day's old ids of one feature) with a ``rate`` share of rows given that
    day's new ids and as many the day before's; ``zipf``: ranks within a block, one per
    row (drawn by the caller, so the old ids' draws do not depend on ``rate``)."""
    k = block(vocab)
    pick = rng.random(ids.size)
    out = ids.copy()
    today = pick < rate
    out[today] = vocab + day * k + zipf[today]
    if day:
        yesterday = (pick >= rate) & (pick < 2 * rate)
        out[yesterday] = vocab + (day - 1) * k + zipf[yesterday]
    return out


def effects(seed: int, f: int, base: np.ndarray, ids: np.ndarray, day: int,
            rate: float, scale: float) -> np.ndarray:
    """Each row's first-order effect on day ``day``: an old id's ``base`` effect plus its
    walk so far, a new id's own effect."""
    vocab, k = base.size, block(base.size)
    w = base.copy()
    for step in range(1, day + 1):
        w += rate * scale * np.random.default_rng([seed, 3 << 20, f, step]).normal(
            0.0, 1.0, vocab)
    out = np.zeros(ids.size)
    old = ids < vocab
    out[old] = w[ids[old]]
    if (~old).any():
        fresh = np.concatenate([np.random.default_rng([seed, 4 << 20, f, d]).normal(
            0.0, NEW_EFFECT_SCALE, k) for d in range(day + 1)])
        out[~old] = fresh[ids[~old] - vocab]
    return out

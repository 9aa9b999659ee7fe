"""Categorical values whose distinct count grows with the rows as Criteo's does.

In the real logs the number of distinct values of a feature grows sublinearly with the
rows (Heaps' law, ``distinct ~ rows ** beta``), and the biggest features grow fastest:
Criteo Kaggle's 45.8M rows hold 10.1M distinct values of its largest feature, Criteo
1TB's 4.37B rows 292M (beta 0.74), while the small features (4 or 24 values) do not grow
at all. ``dlrm synth --criteo-growth`` draws each feature's values so that its distinct
count follows ``KAGGLE[f] * (rows / KAGGLE_ROWS) ** beta[f]`` at any size, with the four
largest growing to Criteo 1TB's 292M, 228M, 187M and 130M at 4.37B rows (about 880M
distinct values over all features there).

How: a Zipf law with exponent ``1 / beta`` over unbounded ranks has about
``gamma(1 - beta) * (n / zeta(1 / beta)) ** beta`` distinct ranks in ``n`` draws; each rank
is split into ``m`` equally likely values, which multiplies that by ``m ** (1 - beta)``
and keeps the exponent; ``m`` is chosen to meet Kaggle's count at Kaggle's size. A
feature that does not grow keeps the generator's fixed Zipf vocabulary.

Below about 155k rows the law would ask for more distinct values of C3 than there are
rows; there, as in a real sample, almost every value is new, and the counts approach the
law from below as the rows grow (C3: 0.90 of it at 250k rows, 0.99 at 4M).
"""

from __future__ import annotations

import math

import numpy as np

KAGGLE_ROWS = 45_840_617
KAGGLE = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
          27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
TERABYTE_ROWS = 4_373_472_329
# Criteo 1TB's distinct values of the four largest features, by Kaggle's order of size.
TERABYTE_LARGEST = {2: 292_000_000, 11: 228_000_000, 20: 187_000_000, 15: 130_000_000}
_SPAN = math.log(TERABYTE_ROWS / KAGGLE_ROWS)
_LARGEST_BETA = min(math.log(v / KAGGLE[f]) / _SPAN for f, v in TERABYTE_LARGEST.items())
VALUE_BITS = 32  # values render as eight hex digits


def growth_exponent(f: int) -> float:
    """Heaps' exponent of feature ``f``: Criteo 1TB's for the four largest; for the rest,
    growing with the log of Kaggle's count, from 0 at 1000 values up to the smallest of
    the four's."""
    if f in TERABYTE_LARGEST:
        return math.log(TERABYTE_LARGEST[f] / KAGGLE[f]) / _SPAN
    smallest = min(KAGGLE[g] for g in TERABYTE_LARGEST)
    share = math.log(KAGGLE[f] / 1000) / math.log(smallest / 1000)
    return _LARGEST_BETA * min(max(share, 0.0), 1.0)


def expected_distinct(f: int, rows: float) -> float:
    """The distinct values of feature ``f`` that ``rows`` rows are drawn to hold."""
    return KAGGLE[f] * (rows / KAGGLE_ROWS) ** growth_exponent(f)


def _zeta(s: float) -> float:
    head = sum(k ** -s for k in range(1, 10_000))
    return head + 10_000 ** (1 - s) / (s - 1) - 0.5 * 10_000 ** -s  # Euler-Maclaurin tail


def _split(f: int) -> int:
    """Values per Zipf rank of feature ``f``, so that Kaggle's size holds Kaggle's count."""
    beta = growth_exponent(f)
    ranks = math.gamma(1 - beta) * (KAGGLE_ROWS / _zeta(1 / beta)) ** beta
    return max(1, round((KAGGLE[f] / ranks) ** (1 / (1 - beta))))


def grows(f: int) -> bool:
    return growth_exponent(f) > 0


def growing_values(rng: np.random.Generator, f: int, n: int) -> np.ndarray:
    """``n`` values of a growing feature ``f`` (below 2**32), drawn as the module says."""
    split = _split(f)
    ranks = rng.zipf(1 / growth_exponent(f), n).astype(np.uint64) - np.uint64(1)
    ranks %= np.uint64((1 << VALUE_BITS) // split)  # the rare rank beyond: wrapped
    return ranks * np.uint64(split) + rng.integers(0, split, n, dtype=np.uint64)

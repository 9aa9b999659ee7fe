"""Recall@K and NDCG@K, against a small case computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dlrm.serve.ranking import ranking_metrics


def test_recall_and_ndcg_by_hand():
    scores = [np.array([0.9, 0.8, 0.1, 0.5]), np.array([0.2, 0.7, 0.3]), np.array([0.4, 0.6])]
    relevant = [np.array([False, True, True, False]), np.array([True, False, False]),
                np.array([False, False])]  # the third user has nothing relevant: skipped
    got = ranking_metrics(scores, relevant, ks=(1, 2, 3))
    # User 0 ranks items 0, 1, 3, 2 (relevant: 1 and 2); user 1 ranks 1, 2, 0 (relevant: 0).
    dcg = 1 / math.log2(3)  # user 0's hit at rank 2
    want = {
        "users": 2,
        "recall@1": 0.0, "ndcg@1": 0.0,
        "recall@2": (1 / 2 + 0) / 2, "ndcg@2": (dcg / (1 + 1 / math.log2(3)) + 0) / 2,
        "recall@3": (1 / 2 + 1) / 2,
        "ndcg@3": (dcg / (1 + 1 / math.log2(3)) + (1 / math.log2(4)) / 1) / 2,
    }
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k

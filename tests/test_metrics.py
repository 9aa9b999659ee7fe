"""Exact AUC / log loss against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score, roc_curve

from dlrm.metrics import auc, binary_metrics, logloss, reliability, roc_points


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _labels_and_scores(rng, n=20_000):
    """Labels correlated with the scores, so the AUC is far from 0.5."""
    scores = rng.normal(size=n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-2 * scores))).astype(np.int64)
    return labels, scores


def test_auc_without_ties(rng):
    labels, scores = _labels_and_scores(rng)
    assert np.unique(scores).size == scores.size
    expected = roc_auc_score(labels, scores)
    assert 0.7 < expected < 0.9
    assert auc(labels, scores) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("decimals", [1, 0])
def test_auc_with_many_ties(rng, decimals):
    labels, scores = _labels_and_scores(rng)
    scores = np.round(scores, decimals)
    assert np.unique(scores).size < 100  # thousands of rows per tied group
    # Shuffled so that tied groups are not sorted by label.
    perm = rng.permutation(labels.size)
    labels, scores = labels[perm], scores[perm]
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)


def test_auc_is_invariant_to_monotone_transforms(rng):
    labels, scores = _labels_and_scores(rng, 5000)
    probs = 1 / (1 + np.exp(-scores))
    assert auc(labels, probs) == pytest.approx(auc(labels, scores), abs=1e-12)
    assert auc(labels.astype(np.float32), scores.astype(np.float32)) == pytest.approx(
        roc_auc_score(labels, scores.astype(np.float32)), abs=1e-9)


def test_auc_small_cases():
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    # One tied (positive, negative) pair counts half: (1 + 1 + 0.5 + 1) / 4.
    assert auc([0, 1, 0, 1], [0.1, 0.3, 0.3, 0.4]) == 0.875


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0, 0, 0], []])
def test_auc_single_class_is_nan(labels):
    assert math.isnan(auc(np.array(labels), np.linspace(0, 1, len(labels))))


def test_logloss_matches_sklearn(rng):
    labels, scores = _labels_and_scores(rng)
    probs = 1 / (1 + np.exp(-scores))
    assert logloss(labels, probs) == pytest.approx(log_loss(labels, probs), rel=1e-12)


def test_logloss_clips_certain_mistakes():
    value = logloss([1, 0], [0.0, 1.0])
    assert math.isfinite(value)
    assert value == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_binary_metrics_from_logits(rng):
    labels, logits = _labels_and_scores(rng, 4000)
    probs = 1 / (1 + np.exp(-logits))
    m = binary_metrics(labels, logits)
    assert m["rows"] == 4000
    assert m["auc"] == pytest.approx(roc_auc_score(labels, logits), abs=1e-9)
    assert m["logloss"] == pytest.approx(log_loss(labels, probs), rel=1e-9)
    assert m["ctr"] == pytest.approx(labels.mean())
    assert m["predicted_ctr"] == pytest.approx(probs.mean())


def test_binary_metrics_extras_match_independent_float64(rng):
    labels, logits = _labels_and_scores(rng, 3000)
    probs = 1 / (1 + np.exp(-logits))
    m = binary_metrics(labels, logits)
    ctr = labels.mean()
    base = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr))
    assert m["ne"] == pytest.approx(log_loss(labels, probs) / base, rel=1e-9)
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, probs > 0.5), abs=1e-12)
    assert m["calibration"] == pytest.approx(probs.mean() / ctr, rel=1e-12)


def test_roc_points_follow_sklearn_curve(rng):
    labels, scores = _labels_and_scores(rng, 5000)
    scores = np.round(scores, 1)  # many ties
    pts = roc_points(labels, scores, points=101)
    fpr, tpr, _ = roc_curve(labels, scores)
    assert pts["fpr"][0] == 0 and pts["tpr"][0] == 0 and pts["fpr"][-1] == pts["tpr"][-1] == 1
    assert np.all(np.diff(pts["fpr"]) >= 0) and np.all(np.diff(pts["tpr"]) >= 0)
    # Every point kept lies on sklearn's curve (one point per distinct score).
    on_curve = {(round(a, 6), round(b, 6)) for a, b in zip(fpr, tpr, strict=True)}
    assert all((a, b) in on_curve for a, b in zip(pts["fpr"], pts["tpr"], strict=True))
    assert 20 <= len(pts["fpr"]) <= 101


def test_reliability_bins_cover_every_row(rng):
    labels, logits = _labels_and_scores(rng, 1003)
    probs = 1 / (1 + np.exp(-logits))
    cal = reliability(labels, probs, bins=20)
    assert sum(cal["rows"]) == 1003 and len(cal["rows"]) == 20
    assert cal["predicted"] == sorted(cal["predicted"])
    weighted = sum(o * n for o, n in zip(cal["observed"], cal["rows"], strict=True))
    assert weighted / 1003 == pytest.approx(labels.mean(), abs=1e-5)


def test_regression_metrics_by_hand():
    from dlrm.metrics import regression_metrics, split_metrics

    m = regression_metrics(np.array([1.0, 2.0, 4.0]), np.array([2.0, 2.0, 1.0]))
    assert m["rmse"] == pytest.approx(np.sqrt((1 + 0 + 9) / 3))
    assert m["mae"] == pytest.approx(4 / 3)
    assert (m["mean_label"], m["mean_prediction"], m["rows"]) == (pytest.approx(7 / 3), 5 / 3, 3)
    assert split_metrics("regression", [1.0], [1.0])["rmse"] == 0.0
    assert "auc" in split_metrics("binary", [0.0, 1.0], [0.1, 0.9])

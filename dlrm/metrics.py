"""Exact metrics over a whole split, in float64: binary classification (a click) and
regression (a number)."""

from __future__ import annotations

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC (Mann-Whitney U), ties between scores counted as half.

    Args:
        labels: N values in {0, 1}.
        scores: N scores; any monotone transform (logit or probability) gives the same AUC.

    Returns:
        The AUC, or NaN when only one class is present.
    """
    labels = np.asarray(labels, dtype=np.float64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = labels.sum()
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    # Average 1-based rank of each group of tied scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], sorted_scores.size]
    group_rank = (starts + 1 + ends) / 2.0
    ranks = np.repeat(group_rank, ends - starts)
    pos_rank_sum = ranks[labels[order] == 1].sum()
    return float((pos_rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy (natural log) of probabilities clipped to [eps, 1-eps]."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1.0 - eps)
    return float(-np.mean(labels * np.log(p) + (1.0 - labels) * np.log1p(-p)))


def normalized_entropy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Log loss divided by the entropy of the observed CTR (He et al., 2014): below 1
    means better than always predicting the average click rate."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    ctr = float(np.mean(labels)) if labels.size else float("nan")
    if not 0.0 < ctr < 1.0:
        return float("nan")
    base = -(ctr * np.log(ctr) + (1.0 - ctr) * np.log1p(-ctr))
    return logloss(labels, probs) / base


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def binary_metrics(labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """AUC, log loss, normalized entropy, accuracy (at 0.5), observed and predicted CTR,
    calibration (predicted / observed CTR) and row count of one split."""
    labels = np.asarray(labels, dtype=np.float64)
    probs = sigmoid(logits)
    n = len(labels)
    ctr = float(np.mean(labels)) if n else float("nan")
    predicted = float(np.mean(probs)) if n else float("nan")
    return {
        "auc": auc(labels, logits),
        "logloss": logloss(labels, probs) if n else float("nan"),
        "ne": normalized_entropy(labels, probs),
        "accuracy": float(np.mean((probs > 0.5) == (labels > 0.5))) if n else float("nan"),
        "ctr": ctr,
        "predicted_ctr": predicted,
        "calibration": predicted / ctr if n and ctr > 0 else float("nan"),
        "rows": int(n),
    }


def regression_metrics(labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """RMSE, MAE, the mean label and mean prediction, and the row count of one split."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    predictions = np.asarray(predictions, dtype=np.float64).ravel()
    n = len(labels)
    error = predictions - labels
    nan = float("nan")
    return {"rmse": float(np.sqrt(np.mean(error ** 2))) if n else nan,
            "mae": float(np.mean(np.abs(error))) if n else nan,
            "mean_label": float(np.mean(labels)) if n else nan,
            "mean_prediction": float(np.mean(predictions)) if n else nan,
            "rows": int(n)}


# What each kind of label is judged by: its metrics, and the two the trainer summarises.
HEADLINE = {"binary": ("auc", "logloss"), "regression": ("rmse", "mae")}


def split_metrics(kind: str, labels: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
    """The metrics of a split whose label is ``kind`` (binary: ``outputs`` are logits)."""
    if kind == "regression":
        return regression_metrics(labels, outputs)
    return binary_metrics(labels, outputs)


def roc_points(labels: np.ndarray, scores: np.ndarray, points: int = 201,
               ) -> dict[str, list[float]]:
    """The ROC curve (false / true positive rates), thinned to about ``points`` points
    at evenly spaced false-positive rates (ties handled: one point per distinct score)."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    order = np.argsort(-np.asarray(scores, dtype=np.float64).ravel(), kind="stable")
    y, s = labels[order], np.asarray(scores, dtype=np.float64).ravel()[order]
    last = np.r_[s[1:] != s[:-1], True]  # the end of each group of tied scores
    tp, fp = np.cumsum(y)[last], np.cumsum(1.0 - y)[last]
    tpr = np.r_[0.0, tp / max(tp[-1], 1.0)] if len(tp) else np.zeros(1)
    fpr = np.r_[0.0, fp / max(fp[-1], 1.0)] if len(fp) else np.zeros(1)
    keep = np.unique(np.searchsorted(fpr, np.linspace(0.0, 1.0, points)).clip(0, len(fpr) - 1))
    return {"fpr": fpr[keep].round(6).tolist(), "tpr": tpr[keep].round(6).tolist()}


def curves(labels: np.ndarray, logits: np.ndarray) -> dict[str, dict[str, list]]:
    """The ROC curve and the calibration curve of a split (what ``dlrm report`` plots)."""
    return {"roc": roc_points(labels, logits), "calibration": reliability(labels, sigmoid(logits))}


def regression_curves(labels: np.ndarray, predictions: np.ndarray, bins: int = 20,
                      points: int = 2000) -> dict[str, dict[str, list]]:
    """What ``dlrm report`` plots of a regression: predicted against actual (rows bucketed
    by prediction into ``bins`` equal-count bins: each bin's mean prediction and mean label),
    a histogram of the residuals (prediction - label), and an even sample of ``points``
    (label, prediction) pairs."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    predictions = np.asarray(predictions, dtype=np.float64).ravel()
    binned = reliability(labels, predictions, bins)
    residual = predictions - labels
    counts, edges = np.histogram(residual, bins=40) if residual.size else (np.zeros(0), [0.0])
    take = np.linspace(0, max(labels.size - 1, 0), min(points, labels.size)).astype(np.int64)
    return {"binned": binned,
            "residuals": {"edges": [round(float(e), 6) for e in edges],
                          "counts": [int(c) for c in counts]},
            "sample": {"label": labels[take].round(6).tolist(),
                       "prediction": predictions[take].round(6).tolist()}}


def reliability(labels: np.ndarray, probs: np.ndarray, bins: int = 20) -> dict[str, list]:
    """Calibration curve: rows bucketed by predicted probability into ``bins`` equal-count
    bins; each bin's mean prediction, observed click rate and size."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    probs = np.asarray(probs, dtype=np.float64).ravel()
    order = np.argsort(probs, kind="stable")
    parts = [p for p in np.array_split(order, min(bins, max(len(order), 1))) if len(p)]
    return {"predicted": [round(float(probs[p].mean()), 6) for p in parts],
            "observed": [round(float(labels[p].mean()), 6) for p in parts],
            "rows": [int(len(p)) for p in parts]}

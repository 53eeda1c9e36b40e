"""Calibration of the router's probabilities and the choice of its fallback threshold.

Temperature scaling (one scalar fitted by NLL on validation windows) keeps the ranking and fixes
the overconfidence a linear model learns on easy training windows. The threshold is the lowest
top-probability whose accepted validation windows still reach the target accuracy.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar


def log_softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of a score matrix (n x classes), stable for large scores."""
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of a score matrix (n x classes): the router's probabilities."""
    return np.exp(log_softmax(z))


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) on held-out data."""
    rows = np.arange(len(targets))

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t))[rows, targets].mean())

    res = minimize_scalar(nll, bounds=(-3.0, 3.0), method="bounded")
    return float(np.exp(res.x))


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE: |accuracy - confidence| per equal-width confidence bin, weighted by the bin's share."""
    confidence = np.asarray(confidence, dtype=float)
    correct = np.asarray(correct, dtype=float)
    if not len(confidence):
        return 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(ece)


def choose_threshold(confidence: np.ndarray, correct: np.ndarray, target: float) -> float:
    """Lowest threshold t such that examples with confidence >= t are right at >= `target`.

    Maximises coverage at the target accuracy; 0.0 when every example may pass, and just above
    the highest confidence (everything falls back) when no threshold reaches the target.
    """
    confidence = np.asarray(confidence, dtype=float)
    correct = np.asarray(correct, dtype=bool)
    if not len(confidence):
        return 0.0
    order = np.argsort(-confidence, kind="stable")
    conf, ok = confidence[order], correct[order]
    accuracy = np.cumsum(ok) / np.arange(1, len(ok) + 1)
    # Only cut between distinct confidences: ties are accepted or refused together.
    cut_allowed = np.append(conf[1:] < conf[:-1], True)
    passing = np.flatnonzero((accuracy >= target) & cut_allowed)
    if not len(passing):
        return float(np.nextafter(conf[0], np.inf))
    k = passing[-1]
    return 0.0 if k == len(conf) - 1 else float(conf[k])


def coverage_curve(
    confidence: np.ndarray, correct: np.ndarray, thresholds: np.ndarray | None = None
) -> dict[str, list[float]]:
    """Accuracy of the accepted examples and the share accepted, for each threshold."""
    confidence = np.asarray(confidence, dtype=float)
    correct = np.asarray(correct, dtype=bool)
    thresholds = np.linspace(0.0, 0.99, 34) if thresholds is None else thresholds
    acc, cov = [], []
    for t in thresholds:
        sel = confidence >= t
        cov.append(float(sel.mean()) if len(sel) else 0.0)
        acc.append(float(correct[sel].mean()) if sel.any() else 1.0)
    return {"threshold": [float(t) for t in thresholds], "accuracy": acc, "coverage": cov}

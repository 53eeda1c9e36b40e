"""Temperature scaling, ECE, threshold selection; the threshold reaches its target on validation."""

from __future__ import annotations

import numpy as np
import pytest

from experts.config import RouterSpec
from router.calibration import (
    choose_threshold,
    coverage_curve,
    expected_calibration_error,
    fit_temperature,
)
from router.features import TfidfFeatures
from router.train import fit_router


def test_ece_of_perfect_and_overconfident_predictions():
    assert expected_calibration_error(np.full(10, 1.0), np.ones(10, bool)) == 0.0
    assert expected_calibration_error(np.full(10, 0.95), np.array([1] * 5 + [0] * 5, bool)) == pytest.approx(
        0.45
    )
    assert expected_calibration_error(np.array([]), np.array([], bool)) == 0.0


def test_temperature_softens_overconfident_logits():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, 2000)
    logits = rng.normal(size=(2000, 3))
    logits[np.arange(2000), targets] += 1.0  # right ~60% of the time ...
    temperature = fit_temperature(logits * 8, targets)  # ... but scaled to look certain
    assert 4 < temperature < 16

    def ece(z: np.ndarray) -> float:
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return expected_calibration_error(p.max(1), p.argmax(1) == targets)

    assert ece(logits * 8 / temperature) < 0.05 < ece(logits * 8)


def test_choose_threshold_maximises_coverage_at_target():
    conf = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5])
    correct = np.array([1, 1, 1, 1, 0, 1, 0], bool)
    assert choose_threshold(conf, correct, target=1.0) == 0.8  # the four most confident are right
    assert choose_threshold(conf, correct, target=5 / 6) == 0.6
    assert choose_threshold(conf, correct, target=0.5) == 0.0  # everything may pass
    nothing = choose_threshold(conf, np.zeros(7, bool), target=0.9)
    assert nothing > 0.99  # nothing reaches the target: everything falls back


def test_threshold_ties_are_accepted_or_refused_together():
    conf = np.array([0.9, 0.9, 0.9, 0.5])
    correct = np.array([1, 1, 0, 1], bool)
    assert choose_threshold(conf, correct, target=0.99) > 0.9


def test_coverage_curve_is_monotone():
    rng = np.random.default_rng(1)
    conf = rng.uniform(size=500)
    curve = coverage_curve(conf, rng.uniform(size=500) < conf)
    assert curve["coverage"][0] == 1.0 and all(np.diff(curve["coverage"]) <= 0)
    assert curve["accuracy"][-1] > curve["accuracy"][0]


@pytest.mark.parametrize("target", [0.9, 0.97])
def test_fitted_threshold_reaches_target_on_validation(toy_examples, target):
    # Short, noisy texts: the top-1 accuracy is below the target, so the threshold must work.
    labels = ["biomedical", "legal", "python_docs"]
    router, metrics = fit_router(
        labels,
        toy_examples(120, seed=2, labels=tuple(labels)),
        toy_examples(200, seed=3, labels=tuple(labels)),
        RouterSpec(target_accuracy=target),
        TfidfFeatures(),
    )
    assert metrics["accepted_accuracy"] >= target
    assert 0.0 <= router.threshold <= 1.0 and metrics["coverage"] > 0.5
    assert metrics["ece_after"] <= metrics["ece_before"] + 0.01


def test_configured_threshold_wins(toy_examples):
    router, _ = fit_router(
        ["biomedical", "legal"],
        toy_examples(30, seed=0, labels=("biomedical", "legal")),
        toy_examples(30, seed=1, labels=("biomedical", "legal")),
        RouterSpec(threshold=0.42),
        TfidfFeatures(),
    )
    assert router.threshold == 0.42

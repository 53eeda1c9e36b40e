"""Which training profile `moe demo` uses: the time-budgeted one only where training is slow."""

from __future__ import annotations

import dataclasses

from experts.config import TrainSpec, compose
from serving.demo import BUDGET_PROFILE, demo_overrides


def test_slow_training_gets_the_budgeted_profile():
    assert demo_overrides(["router=combined"], fast_training=False) == ["router=combined", BUDGET_PROFILE]


def test_fast_training_keeps_the_quick_profile():
    assert demo_overrides(["router=combined"], fast_training=True) == ["router=combined"]


def test_a_training_choice_of_the_user_wins():
    for given in (["train=quick"], ["train.steps=5"], ["+train.max_minutes=2"]):
        assert demo_overrides(given, fast_training=False) == given


def test_the_budgeted_profile_is_the_quick_one_on_a_time_budget():
    budget = compose([BUDGET_PROFILE]).train
    assert budget.max_minutes == 1 and budget.batch_size == 4 and budget.steps == TrainSpec().steps
    differs = {
        f.name
        for f in dataclasses.fields(TrainSpec)
        if getattr(budget, f.name) != getattr(TrainSpec(), f.name)
    }
    assert differs == {"profile", "batch_size", "eval_batches", "test_batches", "max_minutes"}

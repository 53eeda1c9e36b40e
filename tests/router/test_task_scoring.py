"""How `moe eval` scores a multiple-choice option (router/task_eval.py), on real model scores.

The fixture's right answers are known (each passage names its speaker), so a rule that fails on it
fails to read the question. A random-weight model knows nothing, so this uses the real SmolLM2-135M
weights (converted once into the shared cache; they load in well under a second).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from experts.data.tasks import Choice
from router.task_eval import (
    CHOICE_RULE,
    CHOICE_RULES,
    NEUTRAL_QUESTION,
    _example_rows,
    _scorer,
    choice_correct,
    choice_priors,
    neutral_question,
)

FIXTURE = Path(__file__).parents[1] / "fixtures" / "choice_in_context.yaml"
SYSTEM = "You are a helpful assistant."


def fixture_choices() -> list[Choice]:
    rows = yaml.safe_load(FIXTURE.read_text())
    return [
        Choice(
            "president",
            f"item{i}",
            r["question"],
            tuple(r["options"]),
            r["options"].index(r["answer"]),
            tuple(f"item{i}" for _ in r["options"]),
        )
        for i, r in enumerate(rows)
    ]


@pytest.fixture(scope="module")
def real_scores():
    """(choices, option scores, option priors) under the real SmolLM2-135M base, fp32 on the CPU."""
    from experts.adapters import ExpertPool
    from experts.base_model import ensure_base_model
    from experts.config import compose

    app = compose([])
    assert app.base_model.name == "smollm2_135m"
    ensure_base_model(app.base_model, app.paths)
    pool = ExpertPool.load(app, [], device="cpu", precision="fp32")
    score = _scorer(pool, 8)
    choices = fixture_choices()
    examples = _example_rows(pool.tokenizer, SYSTEM, [(c.question, o) for c in choices for o in c.options])
    scores = score(examples, ["base"] * len(examples))
    priors = choice_priors(score, pool.tokenizer, SYSTEM, choices, ["base"] * len(choices))
    return choices, scores, priors


@pytest.mark.integration
def test_the_chosen_rule_reads_the_passage_and_the_summed_one_does_not(real_scores):
    choices, scores, priors = real_scores
    accuracy = {rule: float(choice_correct(scores, choices, rule, priors).mean()) for rule in CHOICE_RULES}
    print(accuracy)
    assert accuracy[CHOICE_RULE] >= 0.6  # chance is 0.25
    assert accuracy["sum"] <= 0.25  # short names win whatever the passage says
    assert accuracy[CHOICE_RULE] - accuracy["sum"] >= 0.4
    # a wrong answer key fails: shifting every key loses what the rule got right
    shifted = [dataclasses.replace(c, answer=(c.answer + 1) % len(c.options)) for c in choices]
    assert float(choice_correct(scores, shifted, CHOICE_RULE, priors).mean()) <= 1 - accuracy[CHOICE_RULE]


@pytest.mark.integration
def test_priors_are_the_options_after_the_instruction_alone(real_scores):
    choices, scores, priors = real_scores
    assert priors.shape == scores.shape
    # same option, same instruction: the same prior whatever the passage
    first = {}
    for c_i, c in enumerate(choices):
        for o_i, option in enumerate(c.options):
            row = priors[c_i * len(c.options) + o_i]
            first.setdefault(option, row)
            assert torch.equal(row, first[option]), option
    assert (priors[:, 1] >= 2).all()  # at least one name token and the end of turn
    # the passage changes the options' scores: the question is not the neutral one
    assert not torch.allclose(scores[:, 0], priors[:, 0])


def test_each_rule_on_hand_made_scores():
    item = fixture_choices()[0]
    n = len(item.options)
    # option 0 is the key: 4 tokens at -1 (sum -4, mean -1); option 1: 1 token at -2 (sum -2, mean -2)
    scores = torch.tensor([[-4.0, 4.0], [-2.0, 1.0], [-9.0, 3.0], [-9.0, 3.0]])[:n]
    key0 = dataclasses.replace(item, answer=0)
    assert choice_correct(scores, [key0], "mean").tolist() == [1.0]
    assert choice_correct(scores, [key0], "sum").tolist() == [0.0]
    # calibrated: option 1's prior is as high as its score (the passage adds nothing)
    prior = torch.tensor([[-8.0, 4.0], [-2.0, 1.0], [-9.0, 3.0], [-9.0, 3.0]])[:n]
    assert choice_correct(scores, [key0], "calibrated", prior).tolist() == [1.0]
    with pytest.raises(ValueError, match="needs the options' scores"):
        choice_correct(scores, [key0], "calibrated")
    with pytest.raises(ValueError, match="unknown multiple-choice rule 'median'"):
        choice_correct(scores, [key0], "median")


def test_neutral_question_drops_the_passage():
    assert (
        neutral_question("Which title fits this abstract?\n\nWe studied mice.")
        == "Which title fits this abstract?"
    )
    assert neutral_question("What does `ls` do?") == NEUTRAL_QUESTION

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
from experts.errors import ArtifactError
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
from router.task_report import paired_difference, render_paired

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


def _report(right: list[int], answers: list[list[float]], keys: list[str] | None = None) -> dict:
    keys = keys or [f"title:{i}" for i in range(len(right))]
    per_row = {"choice": right, "answer": answers}
    return {
        "domains": ["legal"],
        "per_item": {
            "legal": {"choice_items": keys, "answer_items": keys[: len(answers)], "own expert": per_row}
        },
    }


def test_paired_difference_is_item_by_item():
    before = _report([1, 0, 0, 1], [[-4.0, 2], [-9.0, 3], [-1.0, 1], [-2.0, 2]])
    after = _report([1, 1, 0, 0], [[-2.0, 2], [-6.0, 3], [-1.0, 1], [-2.0, 2]])
    cell = paired_difference(before, after)["own expert"]["legal"]
    # accuracy: item-wise 0, +1, 0, -1 -> mean 0, and the interval holds the per-item spread
    assert cell["accuracy"]["value"] == 0 and cell["accuracy"]["lo"] < 0 < cell["accuracy"]["hi"]
    # answer loss, token-weighted: (after - before) summed nats / tokens = (-2 - 3 + 0 + 0) / 8
    rows = (after["per_item"]["legal"]["own expert"], before["per_item"]["legal"]["own expert"])
    gained = sum(a[0] - b[0] for a, b in zip(rows[0]["answer"], rows[1]["answer"], strict=True))
    assert cell["answer_loss"]["value"] == pytest.approx(-gained / 8, abs=1e-4)
    assert cell["answer_loss"]["hi"] <= 0 and cell["answer_loss"]["n"] == 4
    assert "| own expert |" in render_paired(paired_difference(before, after), ["legal"])


def test_paired_difference_refuses_other_items():
    before = _report([1, 0], [[-1.0, 1]])
    with pytest.raises(ArtifactError, match="different choice items"):
        paired_difference(before, _report([1, 0], [[-1.0, 1]], keys=["title:0", "title:9"]))
    with pytest.raises(ArtifactError, match="answer tokens differ"):
        paired_difference(before, _report([1, 0], [[-1.0, 2]]))
    with pytest.raises(ArtifactError, match="no per-item scores"):
        paired_difference(before, {"domains": ["legal"]})

"""`moe eval` end to end on two small user experts: the perplexity matrix and the routing section."""

from __future__ import annotations

import json

import pytest

from router.task_eval import CHOICE_RULE, CHOICE_RULES
from router.task_report import paired_difference
from tests.conftest import run_moe as moe
from tests.conftest import write_toy_folder

COOKING = [
    "simmer",
    "saute",
    "dough",
    "flour",
    "butter",
    "oven",
    "recipe",
    "garlic",
    "onion",
    "braise",
    "whisk",
    "sauce",
    "pastry",
    "knead",
    "yeast",
    "roast",
    "skillet",
    "broth",
]


@pytest.mark.integration
@pytest.mark.slow  # ~80 s on an AVX2-only 2-core machine
def test_eval_writes_matrix_routing_and_plots(user_conf, tiny_app, tmp_path):
    write_toy_folder(tmp_path / "cook_texts", seed=5, words=COOKING)
    (user_conf / "expert" / "cook.yaml").write_text(
        "# @package _global_\nexpert:\n  name: cook\n  description: Cooking notes written for the tests.\n"
        f"  data:\n    source: folder\n    path: {tmp_path / 'cook_texts'}\n    split: [0.6, 0.2, 0.2]\n"
    )
    common = [
        "experts=[toy,cook]",
        "base_model=tiny",
        "train=tiny",
        "router.background=false",
        "router.max_windows_per_expert=400",
        # The report is what this test checks, not the router: TF-IDF trains in seconds where the
        # default `tuned` took 58 s and its routing report 44 s more on an AVX2-only 2-core machine
        # (the tuned router's report: tests/router/test_router_integration.py).
        "router=tfidf",
    ]
    for step in (
        ["data", "expert=toy"],
        ["data", "expert=cook"],
        ["train", "expert=toy"],
        ["train", "expert=cook"],
        ["train-router"],
        ["eval"],
    ):
        out = moe(*step, *common)
        assert out.returncode == 0, f"{step}: {out.stderr[-2000:]}"
    reports = tmp_path / "artifacts" / "reports"
    report = json.loads((reports / "eval.json").read_text())
    ppl = report["perplexity"]
    assert set(ppl) == {"base", "toy", "cook", "routed", "mixture", "mixture_context"}
    assert report["domains"] == ["cook", "toy"]
    for model in ppl:
        assert all(ppl[model][d] > 1 for d in report["domains"])
    # the two vocabularies share no word: the router must send each domain's blocks to its own expert
    for domain, picks in report["routed_picks"].items():
        assert max(picks, key=picks.get) == domain
    # routed uses the chosen expert's adapter, so on a perfectly routed domain it equals that expert
    for d in report["domains"]:
        if report["routed_picks"][d] == {d: report["blocks_per_domain"]}:
            assert ppl["routed"][d] == pytest.approx(ppl[d][d], rel=1e-3)
    # Bayes over the block's own tokens: never worse than the prior-weighted mixture by much, and
    # within log(1/prior) nats a block of its best component (the routed expert here)
    for d in report["domains"]:
        assert ppl["mixture_context"][d] <= ppl["mixture"][d] * 1.01
    assert "routing" in report and (reports / "perplexity_heatmap.png").stat().st_size > 1000
    assert "| routed |" in (reports / "eval.md").read_text()
    # the task table: every row on every domain, accuracies and intervals that make sense
    tasks = report["tasks"]
    assert tasks["domains"] == ["cook", "toy"]
    assert set(tasks["choice_accuracy"]) == {"base", "own expert", "routed", "mixture"}
    for row in (*tasks["choice_accuracy"].values(), *tasks["answer_loss"].values()):
        for d in tasks["domains"]:
            s = row[d]
            assert s["lo"] <= s["value"] <= s["hi"] and s["n"] == tasks["items"][d]["choices"] > 0
    for row in tasks["choice_accuracy"].values():
        assert all(0 <= row[d]["value"] <= 1 for d in tasks["domains"])
    for d in tasks["domains"]:  # each question goes to its own expert: routed equals it
        assert tasks["answer_loss"]["routed"][d]["value"] == pytest.approx(
            tasks["answer_loss"]["own expert"][d]["value"], rel=1e-3
        )
    # every scoring rule on every row; the table's is the chosen one's (routed: the priors it reuses)
    by_rule = tasks["choice_accuracy_by_rule"]
    assert set(by_rule) == set(CHOICE_RULES) and tasks["choice_rule"] == CHOICE_RULE
    for model, row in tasks["choice_accuracy"].items():
        assert {d: s["value"] for d, s in row.items()} == by_rule[CHOICE_RULE][model]
    for rule in CHOICE_RULES:
        assert by_rule[rule]["routed"] == by_rule[rule]["own expert"]
    assert (
        set(tasks["general"]) == {"base", "toy", "cook"} and tasks["general"]["base"]["change_vs_base"] == 0
    )
    # per-item scores: their means are the table's, and a report paired with itself differs by 0
    for d in tasks["domains"]:
        for row, by_domain in tasks["choice_accuracy"].items():
            right, stats = tasks["per_item"][d][row]["choice"], by_domain[d]
            assert len(right) == stats["n"] and sum(right) / len(right) == pytest.approx(
                stats["value"], abs=1e-4
            )
    same = paired_difference(tasks, tasks)
    cells = [c for r in same.values() for c in r.values()]
    assert cells and all("accuracy" in c for c in cells)
    assert all(s["value"] == 0 for c in cells for s in c.values())
    md = (reports / "eval.md").read_text()
    assert "## Multiple choice" in md and "## Everyday questions" in md
    card = (tmp_path / "artifacts" / "experts" / "toy" / "README.md").read_text()
    assert card.count("## Task scores") == 1 and "| this expert |" in card

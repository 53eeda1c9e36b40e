"""`moe demo` end to end through the real CLI (tiny base, two user experts): it builds everything,
serves, answers one example per expert, exits with DEMO_EXIT=1; a second run reuses what is built."""

from __future__ import annotations

import re

import pytest

from tests.conftest import run_moe, write_toy_folder
from tests.router.test_expert_matrix import COOKING

pytestmark = [pytest.mark.serve, pytest.mark.integration, pytest.mark.slow]
PORT = 8163
ARGS = [
    "demo",
    "base_model=tiny",
    "train=tiny",
    "router=tfidf",
    "router.background=false",
    "router.max_windows_per_expert=300",
    "experts=[toy,cook]",
    f"serve.port={PORT}",
    "serve.pool.torch_threads=1",
]


def test_demo_builds_serves_answers_and_reuses_its_cache(user_conf, tiny_app, tmp_path, monkeypatch):
    write_toy_folder(tmp_path / "cook_texts", seed=5, words=COOKING)
    (user_conf / "expert" / "cook.yaml").write_text(
        "# @package _global_\nexpert:\n  name: cook\n  description: Cooking notes written for the tests.\n"
        f"  data:\n    source: folder\n    path: {tmp_path / 'cook_texts'}\n    split: [0.6, 0.2, 0.2]\n"
        f"  examples: ['{' '.join(COOKING[:7])}']\n"
    )
    monkeypatch.setenv("DEMO_EXIT", "1")
    first = run_moe(*ARGS)
    assert first.returncode == 0, first.stderr[-3000:]
    out = first.stdout
    for slug in ("toy", "cook"):
        assert f"Q [{slug}]" in out
        assert re.search(rf"{slug}: perplexity [\d.]+ -> [\d.]+", out), out  # trained in this run
    # every example got an answer line naming the expert, decision and confidence
    answers = re.findall(r"-> expert=(\w+) decision=(\w+) confidence=([\d.]+)", out)
    asked = re.findall(r"Q \[(\w+)\]", out)
    assert sorted(asked) == ["cook", "toy"] and len(answers) == 2, out
    for slug, (expert, decision, confidence) in zip(asked, answers, strict=True):
        # each example is in its expert's own words: the router sends it there (model auto)
        assert (expert, decision) == (slug, "routed"), (slug, expert, decision)
        assert 0 < float(confidence) <= 1
    assert "demo reached its examples" in out
    assert (tmp_path / "artifacts" / "experts" / "cook" / "adapter_model.safetensors").exists()

    second = run_moe(*ARGS)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "toy: adapter up to date, reused" in second.stdout
    assert "cook: adapter up to date, reused" in second.stdout
    assert "router up to date, reused" in second.stdout
    assert "perplexity" not in second.stdout  # nothing retrained
    took = [int(s) for s in re.findall(r"demo reached its examples in (\d+) s", second.stdout)]
    print(f"demo from cache reached its examples in {took[0]} s")

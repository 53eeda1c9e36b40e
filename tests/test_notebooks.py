"""The notebooks execute end to end (tiny profile), so they cannot rot."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import write_toy_folder
from tests.router.test_expert_matrix import COOKING

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(path: Path, env: dict[str, str], timeout: int = 900) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # committed without outputs
        assert not cell.get("outputs"), f"{path.name} is committed with outputs"
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent.parent)}},
        ).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return nb


@pytest.mark.integration
def test_sweeps_notebook_runs(user_conf, tiny_app, tmp_path):
    nb = run_notebook(
        NOTEBOOKS / "sweeps.ipynb", {"MOE_NOTEBOOK_PROFILE": "tiny", "MOE_NOTEBOOK_EXPERT": "toy"}
    )
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "best trial: r=" in text
    assert list((tmp_path / "artifacts" / "sweeps").glob("*/sweep.png"))


WALKTHROUGH_PORT = 8177  # no other test serves on it


@pytest.mark.integration
@pytest.mark.serve
def test_walkthrough_notebook_runs(user_conf, tiny_app, tmp_path):
    """Data cards -> curves -> router -> eval heatmap -> a live endpoint answering through `openai`,
    on two toy experts with disjoint vocabularies (so routing each example question is checkable)."""
    write_toy_folder(tmp_path / "cook_texts", seed=5, words=COOKING)
    (user_conf / "expert" / "cook.yaml").write_text(
        "# @package _global_\nexpert:\n  name: cook\n  description: Cooking notes written for the tests.\n"
        f"  data:\n    source: folder\n    path: {tmp_path / 'cook_texts'}\n    split: [0.6, 0.2, 0.2]\n"
        "  examples: ['how long should the dough knead before the oven']\n"
    )
    # The fixture's toy question "what is a pulsar" is mostly template words ("what is a"), which a router
    # trained on 400 windows of two 20-word vocabularies may give to either class: ask in domain words.
    toy = user_conf / "expert" / "toy.yaml"
    text = toy.read_text()
    assert "'what is a pulsar'" in text
    toy.write_text(text.replace("'what is a pulsar'", "'a pulsar beside a quasar in the galaxy'"))
    nb = run_notebook(
        NOTEBOOKS / "walkthrough.ipynb",
        {
            "MOE_NOTEBOOK_PROFILE": "tiny",
            "MOE_NOTEBOOK_EXPERTS": "toy,cook",
            "MOE_NOTEBOOK_PORT": str(WALKTHROUGH_PORT),
        },
    )
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    # curves, heatmap, confusion matrices and coverage curve were drawn in the notebook
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4
    reports = tmp_path / "artifacts" / "reports"
    report = json.loads((reports / "eval.json").read_text())
    assert report["domains"] == ["cook", "toy"]
    assert set(report["perplexity"]) == {"base", "cook", "toy", "routed", "mixture", "mixture_context"}
    assert all(set(row) == {"cook", "toy", "mean"} for row in report["perplexity"].values())
    assert (reports / "perplexity_heatmap.png").stat().st_size > 1000
    assert report["routing"]["labels"] == ["cook", "toy"]
    for plot in report["routing"]["plots"].values():
        assert (reports / plot).stat().st_size > 1000

    run = json.loads((reports / "walkthrough.json").read_text())
    assert sorted(run["served"]) == ["cook", "toy"]
    by_expert = {a["meant for"]: a for a in run["answers"]}
    for expert in ("cook", "toy"):  # disjoint vocabularies: each example question goes to its expert
        answer = by_expert[expert]
        assert answer["expert"] == expert and answer["decision"] == "routed", answer
        assert 0 < answer["confidence"] <= 1 and answer["completion_tokens"] > 0
    assert run["stream"]["routing"]["expert"] == "cook" and run["stream"]["chunks"] > 0
    assert run["forced"]["cook"]["routing"]["decision"] == "forced"
    assert run["forced"]["base"]["routing"]["expert"] == "base"
    assert set(run["route"]) >= {"expert", "decision"}
    with pytest.raises(OSError):  # the notebook stopped the endpoint it started
        socket.create_connection(("127.0.0.1", WALKTHROUGH_PORT), timeout=2).close()

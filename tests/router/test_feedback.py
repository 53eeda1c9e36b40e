"""`router.include_feedback`: reviewed misroutes (artifacts/feedback/router.jsonl, written by
`moe feedback export`) become upweighted training examples of the corrected expert."""

from __future__ import annotations

import json
import logging

import pytest

import router.train
from experts.config import compose
from experts.errors import DataError
from router.data import feedback_examples, feedback_path
from router.train import train_router

from .conftest import LABELS, make_examples

# The toy router sends this to python_docs ("module" outweighs "licence"); a reviewer says legal.
MISROUTED = "what is the licence of this module"


def _app(tmp_path, *overrides: str):
    experts = ",".join(LABELS)
    return compose([f"paths.artifacts={tmp_path}", f"experts=[{experts}]", "router=tfidf", *overrides])


def _write_feedback(app, rows: list[dict]) -> None:
    path = feedback_path(app)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def toy_corpora(monkeypatch):
    """train_router on the toy texts of conftest.py instead of the experts' corpora."""
    monkeypatch.setattr(
        router.train, "router_examples", lambda app, labels: (make_examples(150, 0), make_examples(60, 1))
    )


def test_feedback_reroutes_a_misrouted_query_after_retraining(tmp_path, toy_corpora, caplog):
    app = _app(tmp_path)
    assert app.router.include_feedback is False and app.router.feedback_weight > 1
    _write_feedback(
        app,
        [
            {"text": MISROUTED, "label": "legal", "request_id": "r1", "reviewer": "ana"},
            {"text": "the gene of the patient", "label": "unix_man", "request_id": "r2", "reviewer": "ana"},
        ],
    )
    before, metrics = train_router(app)  # the file is there, but include_feedback is off
    assert before.decide([MISROUTED], policy="top1")[0].expert == "python_docs"
    assert metrics["feedback_rows"] == 0

    with caplog.at_level(logging.WARNING, logger="router.data"):
        after, metrics = train_router(_app(tmp_path, "router.include_feedback=true"))
    (decision,) = after.decide([MISROUTED], policy="top1")
    assert decision.expert == "legal", decision.probabilities
    # unix_man is not one of this config's experts: skipped, with a warning naming it.
    assert (metrics["feedback_rows"], metrics["feedback_rows_skipped"]) == (1, 1)
    assert "unix_man" in caplog.text and "not a routable expert" in caplog.text
    saved = json.loads((app.paths.router_dir / "metrics.json").read_text())
    assert saved["feedback_rows"] == 1
    # One correction moves that query, not the experts' own vocabulary.
    texts = ["patient clinical dose tumour", "copyright licence warranty", "import asyncio module tuple"]
    assert [d.expert for d in after.decide(texts, policy="top1")] == LABELS


def test_feedback_rows_are_validated_and_weighted(tmp_path):
    path = tmp_path / "router.jsonl"
    path.write_text(
        json.dumps({"text": "q1", "label": "legal"})
        + "\n\n"
        + json.dumps({"text": "q2", "label": "x"})
        + "\n"
    )
    rows, counts = feedback_examples(path, LABELS, weight=7.0)
    assert (rows.texts, rows.labels, rows.kinds, rows.weights) == (["q1"], ["legal"], ["feedback"], [7.0])
    assert counts == {"used": 1, "skipped": 1}

    path.write_text(
        json.dumps({"text": "q1", "label": "legal"}) + "\n" + json.dumps({"text": " ", "label": "legal"})
    )
    with pytest.raises(DataError, match=r"router.jsonl:2: 'text' must be a non-empty string"):
        feedback_examples(path, LABELS, weight=1.0)
    path.write_text("{not json\n")
    with pytest.raises(DataError, match=r"router.jsonl:1: not valid JSON"):
        feedback_examples(path, LABELS, weight=1.0)


def test_missing_feedback_file_warns_and_trains_without(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="router.data"):
        rows, counts = feedback_examples(tmp_path / "router.jsonl", LABELS, weight=1.0)
    assert len(rows) == 0 and counts == {"used": 0, "skipped": 0}
    assert "moe feedback export" in caplog.text


@pytest.mark.parametrize("option", ["tfidf", "embed", "combined", "fast", "tuned"])
def test_every_router_file_sets_feedback_keys(option):
    """Users switch feedback on without Hydra's `+`: the dataclass defaults (moe_defaults) give every
    router option the keys."""
    app = compose([f"router={option}", "router.include_feedback=true", "router.feedback_weight=3"])
    assert app.router.include_feedback is True and app.router.feedback_weight == 3.0

"""`moe feedback export` formats and `moe stats` numbers on a crafted log."""

from __future__ import annotations

import json

import pytest

from serving.trust.feedback import export_feedback
from serving.trust.querylog import QueryLog
from serving.trust.stats import compute_stats, format_table
from tests.serving.review_helpers import fill_log


@pytest.fixture()
def log(tmp_path):
    with QueryLog(tmp_path / "q.sqlite") as log:
        fill_log(log)
        log.add_review("r1", "misrouted", "ana", correct_expert="unix_man")
        log.add_review("r3", "correct", "ana", correction="Yes: the GPL is copyleft.")
        log.add_review("r2", "accept", "bo")
        log.add_review("r5", "reject", "bo")
        log.add_review("r5", "accept", "bo")  # the latest review counts
        log.add_review("r4", "misrouted", "bo", correct_expert="legal", correction="Ask me about licences.")
        yield log


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_export_formats(log, tmp_path):
    out = tmp_path / "feedback"
    (out).mkdir()
    (out / "politics.jsonl").write_text('{"prompt": "stale", "response": "stale"}\n')
    counts = export_feedback(log, out)
    assert counts == {"legal": 2, "router": 2}
    assert sorted(p.name for p in out.iterdir()) == ["legal.jsonl", "router.jsonl"]  # stale file gone
    legal = read(out / "legal.jsonl")
    assert legal[0] == {
        "prompt": "Is GPL copyleft?",
        "response": "Yes: the GPL is copyleft.",
        "request_id": "r3",
        "reviewer": "ana",
    }
    # a misroute with a corrected answer trains the RIGHT expert
    assert legal[1]["request_id"] == "r4" and legal[1]["response"] == "Ask me about licences."
    router = read(out / "router.jsonl")
    assert router == [
        {"text": "What does fork() return?", "label": "unix_man", "request_id": "r1", "reviewer": "ana"},
        {"text": "Tell me a joke", "label": "legal", "request_id": "r4", "reviewer": "bo"},
    ]
    assert export_feedback(log, out) == counts and read(out / "router.jsonl") == router  # idempotent
    assert export_feedback(log, out, known=["unix_man"]) == {"router": 1}


def test_train_reads_the_exported_file(log, tmp_path, monkeypatch):
    """The expert rows are exactly what experts/train.py takes with train.include_feedback=true."""
    from experts.config import compose
    from experts.train_data import feedback_instructions

    monkeypatch.setenv("MOE_ARTIFACTS", str(tmp_path / "artifacts"))
    app = compose(["expert=legal", "train.include_feedback=true"])
    export_feedback(log, app.paths.artifacts_dir / "feedback")
    rows = feedback_instructions(app, app.get_expert("legal"))
    assert (
        rows[0] == {"prompt": "Is GPL copyleft?", "response": "Yes: the GPL is copyleft."} and len(rows) == 2
    )


def test_stats_numbers(log):
    rows = {r["expert"]: r for r in compute_stats(log)}
    assert list(rows)[0] == "legal" and list(rows)[-1] == "all"  # by volume, then the total
    legal, total = rows["legal"], rows["all"]
    assert (legal["requests"], legal["reviewed"]) == (2, 2)
    assert legal["accept_rate"] == 0 and legal["misroute_rate"] == 0.5 and legal["fallback_rate"] == 0
    assert legal["p50_s"] == pytest.approx(0.35)
    assert rows["base"]["fallback_rate"] == 1.0 and rows["unix_man"]["accept_rate"] == 1.0
    assert total["requests"] == 5 and total["reviewed"] == 5
    assert total["accept_rate"] == pytest.approx(2 / 5) and total["misroute_rate"] == pytest.approx(2 / 5)
    assert total["fallback_rate"] == pytest.approx(1 / 5) and total["error_rate"] == 0
    assert total["p50_s"] == pytest.approx(0.30) and total["p99_s"] == pytest.approx(0.496)
    table = format_table(compute_stats(log))
    assert table.splitlines()[0].split()[:3] == ["expert", "requests", "reviewed"]
    assert "40.0%" in table.splitlines()[-1]


def test_stats_of_an_empty_log(tmp_path):
    with QueryLog(tmp_path / "empty.sqlite") as log:
        (total,) = compute_stats(log)
    assert total["requests"] == 0 and total["accept_rate"] is None and total["p50_s"] is None
    assert "-" in format_table([total])


def test_feedback_and_stats_commands(log, tmp_path, monkeypatch, capsys):
    from serving.cli import main

    artifacts = tmp_path / "artifacts"
    monkeypatch.setenv("MOE_ARTIFACTS", str(artifacts))
    db = str(tmp_path / "q.sqlite")
    assert main(["feedback", "export", f"serve.log_db={db}"]) == 0
    assert read(artifacts / "feedback" / "router.jsonl")[0]["label"] == "unix_man"
    assert main(["stats", f"serve.log_db={db}"]) == 0
    assert "misroute_rate" in capsys.readouterr().out

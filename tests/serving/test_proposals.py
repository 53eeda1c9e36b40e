"""`moe propose-experts` on a real SQLite query log with the real MiniLM encoder and HDBSCAN."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest

from experts.config import compose, config_dir, load_expert_file
from experts.errors import ConfigError
from serving.trust.proposals import PROPOSED_SUFFIX, Cluster, draft_text, load_summary
from serving.trust.querylog import QueryLog
from tests.serving.proposal_log import seed_covered_only, seed_log


@pytest.fixture()
def conf(tmp_path, monkeypatch):
    """A copy of conf/ (drafts land in its expert/ folder) and a fresh artifacts folder."""
    folder = tmp_path / "conf"
    shutil.copytree(config_dir(), folder)
    monkeypatch.setenv("MOE_CONFIG_DIR", str(folder))
    monkeypatch.setenv("MOE_ARTIFACTS", str(tmp_path / "artifacts"))
    return folder


def _log(tmp_path) -> QueryLog:
    return QueryLog(tmp_path / "artifacts" / "logs" / "queries.sqlite")


def _drafts(conf) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((conf / "expert").glob(f"*{PROPOSED_SUFFIX}"))}


def test_two_themes_become_two_pure_clusters_and_two_valid_drafts(conf, tmp_path, capsys):
    from serving.cli import main
    from serving.manage import accept_draft, validate_new_expert
    from serving.trust.stats import format_clusters

    with _log(tmp_path) as log:
        truth = seed_log(log, per_theme=16)
    assert main(["propose-experts"]) == 0
    out = capsys.readouterr().out
    app = compose()
    summary = load_summary(app)
    assert summary is not None and summary["uncovered"] == len(truth)
    clusters = summary["clusters"]
    assert len(clusters) == 2
    majorities = []
    for c in clusters:
        # every representative is a seeded question; the cluster's theme is the one most of them share
        themes = Counter(truth[q] for q in c["representatives"])
        theme = themes.most_common(1)[0][0]
        majorities.append(theme)
        assert c["slug"] in out and c["representatives"][0] in out
    assert sorted(majorities) == ["beekeeping", "sourdough"]

    # purity over every member, from the report's own assignment of questions to clusters
    members = _members(tmp_path, truth)
    assert sorted(members) == sorted(c["slug"] for c in clusters)
    for slug, questions in members.items():
        counts = Counter(truth[q] for q in questions)
        theme, n = counts.most_common(1)[0]
        assert theme != "noise" and n / len(questions) >= 0.8, (slug, counts)

    drafts = _drafts(conf)
    assert sorted(drafts) == sorted(c["slug"] + PROPOSED_SUFFIX for c in clusters)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "notes.txt").write_text("A document on the theme. " * 40)
    for c in clusters:
        slug, path = c["slug"], conf / "expert" / (c["slug"] + PROPOSED_SUFFIX)
        with pytest.raises(ConfigError, match="needs data.path"):  # the draft as written: no corpus yet
            validate_new_expert(slug, app)
        path.write_text(path.read_text().replace("path: ''", f"path: {corpus}"))
        spec = validate_new_expert(slug, app)  # what `moe add-expert <slug>` checks first
        assert spec.name == slug and list(spec.examples) == c["representatives"]
        assert spec.data.source == "folder"
        assert accept_draft(slug) == conf / "expert" / f"{slug}.yaml" and not path.exists()
        assert load_expert_file(conf / "expert" / f"{slug}.yaml").name == slug

    reports = tmp_path / "artifacts" / "reports"
    assert (reports / "proposals.png").stat().st_size > 0
    assert all(c["slug"] in (reports / "proposals.md").read_text() for c in clusters)
    assert all(c["slug"] in format_clusters(summary) for c in clusters)  # what `moe stats` prints


def _members(tmp_path, truth) -> dict[str, list[str]]:
    """Cluster members as the code assigns them (the JSON keeps only representatives)."""
    from router.encoder import load_encoder
    from serving.trust.proposals import propose_experts

    app = compose()
    encoder = load_encoder(app.router.encoder_package, app.paths.downloads_dir)
    with _log(tmp_path) as log:
        result = propose_experts(app, log, encoder)
    assert set(result.questions) == set(truth)
    return {c.slug: [result.questions[i] for i in c.members] for c in result.clusters}


def test_a_second_run_keeps_the_existing_drafts(conf, tmp_path, capsys):
    from serving.cli import main

    with _log(tmp_path) as log:
        seed_log(log, per_theme=12)
    assert main(["propose-experts"]) == 0
    drafts = _drafts(conf)
    assert len(drafts) == 2
    edited = next(iter(drafts))
    (conf / "expert" / edited).write_text(drafts[edited] + "# my edit\n")
    assert main(["propose-experts"]) == 0
    assert "kept the existing" in capsys.readouterr().out
    assert (conf / "expert" / edited).read_text().endswith("# my edit\n")
    assert len(_drafts(conf)) == 2


def test_a_log_with_nothing_off_topic_proposes_nothing(conf, tmp_path, capsys):
    from serving.cli import main

    with _log(tmp_path) as log:
        seed_covered_only(log)
    assert main(["propose-experts"]) == 0
    out = capsys.readouterr().out
    assert "nothing to propose: no uncovered questions among 21 requests" in out
    assert _drafts(conf) == {}


@pytest.mark.parametrize("rows", [0, 3])
def test_an_empty_or_tiny_log_says_so_in_one_line(conf, tmp_path, capsys, rows):
    from serving.cli import main

    with _log(tmp_path) as log:
        for i in range(rows):
            log.record({"prompt": f"question {i}", "decision": "fallback", "expert": "base"})
    with pytest.raises(SystemExit) as exit_:
        main(["propose-experts"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert ("has no requests" in err) if rows == 0 else ("only 3 request(s)" in err)
    assert _drafts(conf) == {}


def test_a_draft_keeps_odd_questions_verbatim(tmp_path):
    questions = ('What does "${HOME}" mean: a path?', "50% off # really?\nsecond line")
    cluster = Cluster("odd_things", 7, 0.1, ("odd", "things"), questions, "legal", 0.5, (0, 1))
    path = tmp_path / ("odd_things" + PROPOSED_SUFFIX)
    path.write_text(draft_text(cluster, "2026-12-02"))
    spec = load_expert_file(path)
    assert spec.name == "odd_things" and spec.examples == questions
    assert spec.data.source == "folder" and not spec.data.path


def test_review_api_serves_the_clusters(tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from serving.trust.review import review_router

    summary = {"created": 1.0, "requests": 9, "uncovered": 6, "noise": 1, "clusters": [{"slug": "bees"}]}
    app = FastAPI()
    with QueryLog(tmp_path / "q.sqlite") as log:
        app.include_router(review_router(log, clusters=lambda: summary))
        body = TestClient(app).get("/review/api/clusters").json()
    assert json.dumps(body["summary"]) == json.dumps(summary)


def test_the_window_and_the_confidence_bar_pick_the_uncovered_questions(conf, tmp_path):
    from serving.trust.proposals import load_questions

    now = 1_800_000_000.0
    with _log(tmp_path) as log:
        log.record({"prompt": "old fallback", "decision": "fallback", "ts": now - 48 * 3600})
        log.record({"prompt": "new fallback", "decision": "fallback", "ts": now - 3600})
        log.record({"prompt": "unsure route", "decision": "routed", "confidence": 0.4, "ts": now - 60})
        log.record({"prompt": "sure route", "decision": "routed", "confidence": 0.8, "ts": now - 60})
        log.record({"prompt": "forced", "decision": "forced", "model": "legal", "ts": now - 60})
        log.flush()
        app = compose(["proposals.since_hours=24", "proposals.max_confidence=0.5"])
        rows, uncovered = load_questions(log, app.proposals, now=now)
        assert len(rows) == 4 and [r["prompt"] for r in uncovered] == ["new fallback", "unsure route"]
        wide = compose(["proposals.max_confidence=0.9"])
        _, uncovered = load_questions(log, wide.proposals, now=now)
        assert [r["prompt"] for r in uncovered] == [
            "old fallback",
            "new fallback",
            "unsure route",
            "sure route",
        ]
    with pytest.raises(ConfigError, match="proposals.min_queries 1 must be >= 2"):
        compose(["proposals.min_queries=1"])

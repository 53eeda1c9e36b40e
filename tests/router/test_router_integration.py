"""The real default router on real corpora (capped), end to end: train, save, load, route, report.

Corpora come from the registry packages through `experts.data.build_corpus` with a document cap,
into a session-scoped artifacts folder. Bounds are loose: the quality targets live in
benchmarks/router_bench.py; here a broken pipeline must fail, a slightly weaker one must not.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from experts.config import compose
from experts.data import build_corpus
from router.metrics import (
    bench_scores,
    held_out_windows,
    load_natural_questions,
    natural_question_metrics,
    routing_report,
    window_metrics,
)
from router.model import load_router, routable_labels
from router.train import train_router

# Building the six corpora took 634 s on a busy 2-core machine: more than pyproject's per-test timeout.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

MAX_DOCUMENTS = 120  # per expert: enough windows for a router, a few seconds to build each corpus
WINDOWS_PER_EXPERT = 300  # a small router; building the six capped corpora dominates (minutes: slow)
# Less to read before the cap: the cap samples after cleaning the whole source, and cleaning all of
# PubMed's ~33k abstracts, or rendering every man page, took ~60 s each on an AVX2-only 2-core machine.
# The first 2,000 abstracts; every man section but the 630 library-call pages of man3.
READ_LESS = {"pubmed": {"max_articles": 2000}, "man": {"files": "usr/share/man/man[124-8]/*"}}
FINETUNE_STEPS = 40  # half the epoch 300 windows make: the router still routes (159 -> 101 s there)


@pytest.fixture(scope="session")
def corpora_app(tmp_path_factory):
    """Config whose artifacts folder (a temporary one) holds every routable expert's corpus, each a
    capped build from the cached registry packages: what `moe data` left in artifacts/ is not read."""
    artifacts = tmp_path_factory.mktemp("router_artifacts")
    app = compose(
        [
            f"paths.artifacts={artifacts}",
            f"router.max_windows_per_expert={WINDOWS_PER_EXPERT}",
            f"router.finetune.max_steps={FINETUNE_STEPS}",
        ]
    )
    for spec in app.experts:
        if spec.routable:
            options = {**spec.data.options, **READ_LESS.get(spec.data.source, {})}
            data = dataclasses.replace(spec.data, max_documents=MAX_DOCUMENTS, options=options)
            build_corpus(dataclasses.replace(spec, data=data), app)
    return app


@pytest.fixture(scope="session")
def trained(corpora_app):
    router, metrics = train_router(corpora_app)
    return corpora_app, router, metrics


def test_train_router_saves_a_loadable_router(trained):
    app, router, metrics = trained
    files = {p.name for p in app.paths.router_dir.iterdir()}
    assert {"router.json", "router.safetensors", "metrics.json", "config.json"} <= files
    assert router.labels == routable_labels(app) and "generalist" not in router.labels
    assert router.pipeline == app.router.pipeline and router.background
    assert 0.0 <= router.threshold < 1.0
    if router.threshold == 0.0:  # the windows the distance/background rules accept meet the target uncut
        assert metrics["accepted_accuracy"] >= app.router.target_accuracy
    assert metrics["accepted_accuracy"] >= app.router.target_accuracy - 0.02
    assert metrics["accuracy_top1_by_words"]["64"] > 0.85
    loaded = load_router(app)
    assert loaded.labels == router.labels and loaded.threshold == router.threshold


def test_natural_questions_route_to_their_expert(trained):
    _, router, _ = trained
    result = natural_question_metrics(router, load_natural_questions())
    assert result["in_domain"] >= 6 * 15 and result["off_topic"] >= 15
    assert result["in_domain_top1_accuracy"] >= 0.75, result["misses"]
    assert result["in_domain_accuracy"] >= 0.6, result["misses"]
    assert result["off_topic_fallback_rate"] >= 0.4, result["off_topic_routed"]
    assert result["in_domain_fallback_rate"] <= 0.35


def test_bench_scores_are_the_window_and_question_metrics(trained):
    """The benches' row (benchmarks/router_*_bench.py) reads each size's accuracy and the questions'
    rates under the fallback policy, keyed as the benchmark tables print them."""
    app, router, _ = trained
    questions = load_natural_questions()
    tests = {w: held_out_windows(app, router.labels, w, 30) for w in (8, 64)}
    row = bench_scores(router, (tests, questions))
    natural = natural_question_metrics(router, questions)
    assert set(row["accuracy"]) == {8, 64}
    for words, examples in tests.items():
        assert len(examples.texts) == 30 * len(router.labels)
        assert row["accuracy"][words] == round(window_metrics(router, examples)["accuracy"], 4)
    assert row["accuracy"][64] > row["accuracy"][8] - 0.05  # longer windows are not routed worse
    assert (row["questions_right"], row["in_domain_fallback"], row["off_topic_fallback"]) == (
        natural["in_domain_accuracy"],
        natural["in_domain_fallback_rate"],
        natural["off_topic_fallback_rate"],
    )


def test_routing_report_writes_numbers_and_plots(trained, tmp_path):
    app, router, _ = trained
    report = routing_report(app, router, tmp_path, words=(8, 32), per_size=40)
    assert set(report["test_windows"]) == {"8", "32"}
    m32 = report["test_windows"]["32"]
    assert m32["accuracy"] > 0.8 and len(m32["confusion"]) == len(router.labels)
    assert 0.0 <= m32["ece"] < 0.2
    latency = report[
        "latency"
    ]  # measured, not judged here: the speed targets are benchmarks/router_bench.py's
    assert 0 < latency["p50_ms"] <= latency["p99_ms"] and latency["throughput_qps"] > 0
    for name in ("routing.json", "routing_confusion.png", "routing_coverage.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert json.loads((tmp_path / "routing.json").read_text())["labels"] == router.labels


def test_moe_route_command(trained):
    app, _, _ = trained
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.cli",
            "route",
            f"paths.artifacts={app.paths.artifacts}",
            "How do I parse command line arguments with argparse in Python?",
            "What is a good recipe for banana bread?",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [set(r) for r in rows] == [{"expert", "confidence", "decision", "probabilities"}] * 2
    assert rows[0]["expert"] == "python_docs" and rows[0]["decision"] == "routed"
    # The off-topic question: fallback, or at least less sure than the in-domain one (a small router).
    assert rows[1]["decision"] == "fallback" or rows[1]["confidence"] < rows[0]["confidence"]

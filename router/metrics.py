"""How well the router routes: held-out test windows, hand-written questions, latency.

`routing_report` is what `moe eval` stores under the `routing` key of artifacts/reports/eval.json.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from sklearn.metrics import confusion_matrix, f1_score

from experts.config import REPO_ROOT, AppConfig
from router.calibration import coverage_curve, expected_calibration_error
from router.data import Examples, expert_examples
from router.model import Router

TEST_WORDS = (8, 16, 32, 64)
TEST_WINDOWS_PER_SIZE = 500  # per expert and window size: 3,000 windows a size, SE ~0.6 pt at 88%
NATURAL_QUESTIONS = REPO_ROOT / "tests" / "fixtures" / "natural_questions.yaml"
OFF_TOPIC = "off_topic"
LATENCY_ROUNDS = 3  # passes over the queries: a busy machine's noise shows as spread between rounds
THROUGHPUT_BATCH = 256


def load_natural_questions(path: Path | None = None) -> dict[str, list[str]]:
    """Hand-written questions per expert slug, plus `off_topic` ones that no expert should take."""
    data = yaml.safe_load(Path(path or NATURAL_QUESTIONS).read_text())
    return {str(k): [str(q) for q in v] for k, v in data.items()}


def held_out_windows(app: AppConfig, labels: Sequence[str], words: int, per_expert: int) -> Examples:
    """Windows of exactly `words` words from every expert's held-out TEST split."""
    return expert_examples(app, labels, "test", per_expert, sizes=(words,))


def window_metrics(router: Router, examples: Examples) -> dict[str, Any]:
    """Accuracy, macro-F1, confusion matrix, ECE and accuracy/coverage of labelled texts."""
    probs = router.predict_proba(examples.texts)
    labels = router.labels
    y = np.array([labels.index(label) for label in examples.labels])
    pred = probs.argmax(1)
    conf = probs.max(1)
    correct = pred == y
    decisions = router.decide(examples.texts, policy="fallback")
    routed = np.array([d.decision == "routed" for d in decisions])
    return {
        "n": int(len(y)),
        "accuracy": float(correct.mean()),
        "macro_f1": float(f1_score(y, pred, average="macro", labels=range(len(labels)))),
        "confusion": confusion_matrix(y, pred, labels=range(len(labels))).tolist(),
        "ece": expected_calibration_error(conf, correct),
        "coverage_at_threshold": float(routed.mean()),
        "accuracy_at_threshold": float(correct[routed].mean()) if routed.any() else None,
        "curve": coverage_curve(conf, correct),
    }


def bench_sets(app: AppConfig, labels: Sequence[str]) -> tuple[dict[int, Examples], dict[str, list[str]]]:
    """What the router benches score every router on: test windows of each TEST_WORDS size, the questions."""
    tests = {w: held_out_windows(app, labels, w, TEST_WINDOWS_PER_SIZE) for w in TEST_WORDS}
    return tests, load_natural_questions()


def bench_scores(router: Router, sets: tuple[dict[int, Examples], dict[str, list[str]]]) -> dict[str, Any]:
    """One bench row's scores: top-1 accuracy per window size, the questions under the fallback policy."""
    tests, questions = sets
    natural = natural_question_metrics(router, questions)
    return {
        "accuracy": {w: round(window_metrics(router, ex)["accuracy"], 4) for w, ex in tests.items()},
        "questions_right": natural["in_domain_accuracy"],
        "in_domain_fallback": natural["in_domain_fallback_rate"],
        "off_topic_fallback": natural["off_topic_fallback_rate"],
    }


def natural_question_metrics(router: Router, questions: dict[str, list[str]]) -> dict[str, Any]:
    """In-domain: share routed to the right expert (fallback counts as a miss), top-1 accuracy,
    share that fell back. Off-topic: share that fell back. Uses the `fallback` policy."""
    in_domain = [(q, label) for label in router.labels for q in questions.get(label, [])]
    off_topic = questions.get(OFF_TOPIC, [])
    texts = [q for q, _ in in_domain] + off_topic
    decisions = router.decide(texts, policy="fallback")
    probs = router.predict_proba(texts)
    inside = decisions[: len(in_domain)]
    outside = decisions[len(in_domain) :]
    top1 = [router.labels[i] for i in probs[: len(in_domain)].argmax(1)]
    per_expert: dict[str, float] = {}
    for label in router.labels:
        rows = [d for d, (_, gold) in zip(inside, in_domain, strict=True) if gold == label]
        if rows:
            per_expert[label] = sum(d.expert == label and d.decision == "routed" for d in rows) / len(rows)
    misses = [
        {
            "question": q,
            "expected": gold,
            "got": d.expert,
            "decision": d.decision,
            "confidence": round(d.confidence, 3),
        }
        for d, (q, gold) in zip(inside, in_domain, strict=True)
        if d.expert != gold
    ]
    leaks = [
        {"question": q, "got": d.expert, "confidence": round(d.confidence, 3)}
        for d, q in zip(outside, off_topic, strict=True)
        if d.decision != "fallback"
    ]
    n_in = max(1, len(in_domain))
    return {
        "in_domain": len(in_domain),
        "off_topic": len(off_topic),
        "in_domain_accuracy": sum(d.expert == g for d, (_, g) in zip(inside, in_domain, strict=True)) / n_in,
        "in_domain_top1_accuracy": sum(t == g for t, (_, g) in zip(top1, in_domain, strict=True)) / n_in,
        "in_domain_fallback_rate": sum(d.decision == "fallback" for d in inside) / n_in,
        "off_topic_fallback_rate": sum(d.decision == "fallback" for d in outside) / max(1, len(outside)),
        "per_expert_accuracy": per_expert,
        "misses": misses,
        "off_topic_routed": leaks,
    }


def latency(router: Router, queries: Sequence[str]) -> dict[str, Any]:
    """Single-query decide() latency (p50/p99 over LATENCY_ROUNDS passes, and each pass's p50;
    ms) on one torch thread, as a serving replica runs it (several threads on a busy 2-core
    machine are many times slower), the 1-minute load average it ran under, and batch
    throughput (queries/s) with the process's threads."""
    import torch

    queries = list(queries) or ["What does this do?"]
    router.decide(queries[:8])  # warm-up: lazy init, allocator
    rounds: list[list[float]] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    try:
        for _ in range(LATENCY_ROUNDS):
            rounds.append([])
            for q in queries:
                start = time.perf_counter()
                router.decide([q])
                rounds[-1].append((time.perf_counter() - start) * 1000)
    finally:
        torch.set_num_threads(threads)
    times = [t for r in rounds for t in r]
    batch = [queries[i % len(queries)] for i in range(THROUGHPUT_BATCH)]
    start = time.perf_counter()
    router.decide(batch)
    elapsed = time.perf_counter() - start
    return {
        "p50_ms": float(np.percentile(times, 50)),
        "p99_ms": float(np.percentile(times, 99)),
        "p50_by_round_ms": [round(float(np.median(r)), 2) for r in rounds],
        "load_1min": round((load + os.getloadavg()[0]) / 2, 2),  # mean of before and after
        "batch_size": THROUGHPUT_BATCH,
        "throughput_qps": THROUGHPUT_BATCH / elapsed,
    }


def _plot_confusions(labels: list[str], by_size: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(by_size), figsize=(4.2 * len(by_size), 4.4), squeeze=False)
    for ax, (words, m) in zip(axes[0], by_size.items(), strict=True):
        cm = np.array(m["confusion"], dtype=float)
        norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(f"{words} words: acc {m['accuracy']:.3f}", fontsize=9)
        for i in range(len(labels)):
            for j in range(len(labels)):
                if cm[i, j]:
                    color = "white" if norm[i, j] > 0.5 else "black"
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6, color=color)
    axes[0][0].set_ylabel("true expert")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_coverage(by_size: dict[str, dict[str, Any]], threshold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for words, m in by_size.items():
        ax.plot(m["curve"]["coverage"], m["curve"]["accuracy"], marker=".", label=f"{words} words")
        ax.scatter([m["coverage_at_threshold"]], [m["accuracy_at_threshold"] or 1.0], marker="x", color="k")
    ax.set_xlabel("coverage (share routed to an expert)")
    ax.set_ylabel("accuracy of routed queries")
    ax.set_title(f"threshold sweep (x: saved threshold {threshold:.2f})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def routing_report(
    app: AppConfig,
    router: Router,
    out_dir: Path,
    *,
    words: Sequence[int] = TEST_WORDS,
    per_size: int = TEST_WINDOWS_PER_SIZE,
    questions: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Evaluate `router` on TEST windows, the natural-question fixture and latency; write
    routing.json, routing_confusion.png and routing_coverage.png into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_size = {
        str(w): window_metrics(router, held_out_windows(app, router.labels, w, per_size)) for w in words
    }
    questions = load_natural_questions() if questions is None else questions
    natural = natural_question_metrics(router, questions)
    all_questions = [q for qs in questions.values() for q in qs]
    report = {
        "pipeline": router.pipeline,
        "labels": router.labels,
        "threshold": router.threshold,
        "temperature": router.temperature,
        "background": router.background,
        "test_windows": by_size,
        "natural_questions": natural,
        "latency": latency(router, all_questions),
        "trained_metrics": router.info.get("metrics", {}),
        "plots": {"confusion": "routing_confusion.png", "coverage": "routing_coverage.png"},
    }
    _plot_confusions(router.labels, by_size, out_dir / "routing_confusion.png")
    _plot_coverage(by_size, router.threshold, out_dir / "routing_coverage.png")
    (out_dir / "routing.json").write_text(json.dumps(report, indent=1) + "\n")
    return report

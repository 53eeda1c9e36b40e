"""Router pipelines side by side on one split: TF-IDF, MiniLM embeddings, both combined, and a
nearest-neighbour baseline over the same embeddings in the style of semantic-router.

    .venv/bin/python benchmarks/router_bench.py [--tuned] [router.max_windows_per_expert=3000 ...]

--tuned adds the `tuned` pipeline (MiniLM fine-tuned on the windows, ~15 min more on 2 cores).

Every pipeline trains on the same windows (the default config's: `router=tuned`'s window count and
background purification; overrides change them for all) of the experts' TRAIN splits (+ the background class
where it has one), is calibrated on the same VALIDATION windows and is measured on the same TEST
windows of 8/16/32/64 words and on the hand-written questions of
tests/fixtures/natural_questions.yaml. Prints a table; saves artifacts/bench/router.json.
Needs the corpora (`moe data expert=all`).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence

import numpy as np

from experts.config import compose
from experts.hardware import machine_report
from router.calibration import choose_threshold
from router.encoder import EmbeddingCache, load_encoder
from router.metrics import (
    OFF_TOPIC,
    TEST_WINDOWS_PER_SIZE,
    TEST_WORDS,
    held_out_windows,
    latency,
    load_natural_questions,
    natural_question_metrics,
    window_metrics,
)
from router.model import BACKGROUND, routable_labels
from router.pipelines import PIPELINES, build_features
from router.train import fit_router, router_examples

NN_TOP_K = 5  # semantic-router scores a route by its top-k most similar utterances
NN_UTTERANCES = 2000  # per expert: the "utterances" of each route


class NearestNeighbourRouter:
    """semantic-router style: a route's score is the mean cosine similarity of its top-k utterances;
    below the score threshold nothing is routed (fallback). No training, no background class."""

    def __init__(
        self, encoder, labels: list[str], texts: Sequence[str], text_labels: Sequence[str], seed: int
    ):
        rng = np.random.default_rng(seed)
        self.encoder, self.labels = encoder, labels
        arr = np.asarray(text_labels)
        rows = [rng.permutation(np.flatnonzero(arr == lab))[:NN_UTTERANCES] for lab in labels]
        self.owner = np.concatenate([np.full(len(r), i) for i, r in enumerate(rows)])
        self.utterances = encoder.encode([texts[i] for i in np.concatenate(rows)])
        self.threshold = 0.0
        self.pipeline = "nn_embed"

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        sims = self.encoder.encode(list(texts)) @ self.utterances.T
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        for c in range(len(self.labels)):
            part = sims[:, self.owner == c]
            out[:, c] = np.sort(part, axis=1)[:, -NN_TOP_K:].mean(axis=1)
        return out

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        return self.scores(texts)  # similarities, not probabilities: top-1 and threshold use them alike

    def decide(self, texts: Sequence[str], policy: str | None = None):
        from router.model import RoutingDecision

        out = []
        for row in self.scores(texts):
            top = int(row.argmax())
            probs = {lab: float(p) for lab, p in zip(self.labels, row, strict=True)}
            if policy == "top1" or row[top] >= self.threshold:
                out.append(
                    RoutingDecision(
                        self.labels[top], {self.labels[top]: 1.0}, float(row[top]), "routed", probs
                    )
                )
            else:
                out.append(RoutingDecision("base", {"base": 1.0}, float(row[top]), "fallback", probs))
        return out


def summarise(name: str, router, tests: dict[int, object], questions, fit_s: float, uncached=None) -> dict:
    """Quality on the shared test windows (cached embeddings), latency with the real encoder."""
    windows = {str(w): window_metrics(router, ex) for w, ex in tests.items()}
    natural = natural_question_metrics(router, questions)
    all_q = [q for qs in questions.values() for q in qs]
    if uncached is not None:
        uncached()
    return {
        "pipeline": name,
        "fit_seconds": round(fit_s, 1),
        "threshold": router.threshold,
        "accuracy": {w: m["accuracy"] for w, m in windows.items()},
        "macro_f1": {w: m["macro_f1"] for w, m in windows.items()},
        "ece": {w: m["ece"] for w, m in windows.items()},
        "natural": {k: v for k, v in natural.items() if k not in ("misses", "off_topic_routed")},
        "misses": natural["misses"],
        "off_topic_routed": natural["off_topic_routed"],
        "latency": latency(router, all_q),
    }


def main(overrides: list[str]) -> dict:
    import torch

    pipelines = [p for p in PIPELINES if p != "tuned"]  # every registered pipeline; tuned on request
    if "--tuned" in overrides:
        overrides = [o for o in overrides if o != "--tuned"]
        pipelines.append("tuned")

    torch.set_num_threads(1)  # single-query latency is best on one thread (serving sets it per replica)
    app = compose(overrides)  # the default router's windows for every pipeline
    labels = routable_labels(app)
    questions = load_natural_questions()
    started = time.perf_counter()
    train, validation = router_examples(app, labels)
    tests = {w: held_out_windows(app, labels, w, TEST_WINDOWS_PER_SIZE) for w in TEST_WORDS}
    print(
        f"examples: train {len(train)}, validation {len(validation)}, test {sum(map(len, tests.values()))} "
        f"({time.perf_counter() - started:.0f}s)",
        flush=True,
    )
    real = load_encoder(app.router.encoder_package, app.paths.downloads_dir)
    cached = EmbeddingCache(real)
    torch.set_num_threads(2)
    questions_flat = [q for qs in questions.values() for q in qs]
    cached.encode(
        train.texts + validation.texts + [t for ex in tests.values() for t in ex.texts] + questions_flat
    )
    torch.set_num_threads(1)
    print(f"embedded everything once ({time.perf_counter() - started:.0f}s)", flush=True)

    results = []
    for pipeline in pipelines:
        t0 = time.perf_counter()
        features = build_features(pipeline, app.router.encoder_package, app.paths.downloads_dir)
        holder = features.frozen_embed()  # None for the tuned pipeline: it trains its own encoder
        if holder is not None:
            holder.encoder = cached
        torch.set_num_threads(2 if pipeline == "tuned" else 1)
        router, _ = fit_router(labels, train, validation, app.router, features)
        torch.set_num_threads(1)
        fit_s = time.perf_counter() - t0

        def uncached(holder=holder) -> None:
            if holder is not None:
                holder.encoder = real  # honest latency: no memo in front of the encoder

        results.append(summarise(pipeline, router, tests, questions, fit_s, uncached))
        print(f"{pipeline}: done ({fit_s:.0f}s fit)", flush=True)

    t0 = time.perf_counter()
    inside = train.subset(lambda label, kind: label != BACKGROUND)
    nn = NearestNeighbourRouter(cached, labels, inside.texts, inside.labels, app.router.seed)
    val_in = validation.subset(lambda label, kind: label != BACKGROUND)
    val_scores = nn.scores(val_in.texts)
    gold = np.array([labels.index(label) for label in val_in.labels])
    nn.threshold = choose_threshold(
        val_scores.max(1), val_scores.argmax(1) == gold, app.router.target_accuracy
    )
    fit_s = time.perf_counter() - t0
    results.append(
        summarise(
            "nn_embed (semantic-router style)",
            nn,
            tests,
            questions,
            fit_s,
            lambda: setattr(nn, "encoder", real),
        )
    )

    machine = machine_report()  # CPU kind, flags and read bandwidth beside every figure
    print(f"machine: {machine}")
    report = {
        "config": overrides,
        "labels": labels,
        "off_topic_key": OFF_TOPIC,
        "machine": machine,
        "results": results,
    }
    print_table(results)
    out = app.paths.artifacts_dir / "bench" / "router.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nsaved {out}")
    return report


def print_table(results: list[dict]) -> None:
    head = (
        f"{'pipeline':<34}"
        + "".join(f"{'acc@' + str(w):>8}" for w in TEST_WORDS)
        + f"{'NQ right':>10}{'NQ in->fb':>10}{'off->fb':>9}{'p50 ms':>8}{'p99 ms':>8}{'q/s':>8}{'fit s':>7}{'load':>6}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for r in results:
        n = r["natural"]
        print(
            f"{r['pipeline']:<34}"
            + "".join(f"{r['accuracy'][str(w)]:>8.3f}" for w in TEST_WORDS)
            + f"{n['in_domain_accuracy']:>10.3f}{n['in_domain_fallback_rate']:>10.3f}"
            + f"{n['off_topic_fallback_rate']:>9.3f}{r['latency']['p50_ms']:>8.2f}{r['latency']['p99_ms']:>8.2f}"
            + f"{r['latency']['throughput_qps']:>8.0f}{r['fit_seconds']:>7.0f}{r['latency']['load_1min']:>6.1f}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])

"""`moe train-router`: fit the router on the experts' TRAIN splits, calibrate it on VALIDATION.

1. Examples: windows of `router.window_words` words from every routable expert's train split,
   plus question-style views (titles, headings, first sentences); a background class of general
   news text when `router.background`.
2. Features (`router.pipeline`) -> multinomial logistic regression (balanced classes).
3. On validation windows: temperature scaling, the nearest-neighbour similarity floor
   (embedding pipelines) and the fallback threshold for `router.target_accuracy`.
4. Save the router with its config and metrics into artifacts/router/.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from experts.config import AppConfig, RouterSpec
from experts.errors import ConfigError
from router.calibration import choose_threshold, expected_calibration_error, fit_temperature, softmax
from router.data import Examples, background_examples, expert_examples, feedback_examples, feedback_path
from router.encoder import EmbeddingCache, SentenceEncoder, embedding_cache_file
from router.features import Features, HeadData
from router.model import BACKGROUND, Router, routable_labels, router_dir
from router.pipelines import build_features

log = logging.getLogger(__name__)

VALIDATION_SHARE = 0.25  # validation windows per expert, as a share of the training budget
PROTOTYPES_PER_CLASS = 1000  # training embeddings kept for the nearest-neighbour distance signal
# The similarity floor lets this share of in-domain validation queries (8+ words) fall below it.
IN_DOMAIN_MISS_RATE = 0.01
SIMILARITY_MIN_WORDS = 8
EMBEDDING_CACHE_DIR = "cache/router_embeddings"  # under paths.artifacts: frozen-encoder vectors by text hash


def _targets(classes: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[label] for label in labels])


def _prototype_rows(labels: Sequence[str], keep: Sequence[str], seed: int) -> np.ndarray:
    """Up to PROTOTYPES_PER_CLASS training rows per expert (background excluded), for the
    nearest-neighbour distance signal."""
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    rows = []
    for label in keep:
        idx = np.flatnonzero(labels_arr == label)
        rows.append(rng.choice(idx, size=min(PROTOTYPES_PER_CLASS, len(idx)), replace=False))
    return np.sort(np.concatenate(rows))


def purify_background(x: Any, targets: np.ndarray, background: int, extra: float = 0.0) -> np.ndarray:
    """Keep the background examples that are closer to the background centroid than to every
    expert's centroid (cosine). General news also covers politics and health; a background
    class that learned those would send in-domain questions to the fallback. `extra`: also drop
    that share of the kept ones, those whose margin over their nearest expert is smallest."""
    keep = np.ones(len(targets), dtype=bool)
    rows = np.flatnonzero(targets == background)
    if not len(rows):
        return keep
    centroids = np.vstack([np.asarray(x[targets == c].mean(axis=0)).ravel() for c in range(background + 1)])
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    sims = np.asarray(x[rows] @ centroids.T)
    margin = sims[:, background] - sims[:, :background].max(axis=1)
    nearer = margin >= 0
    keep[rows] = nearer
    if extra > 0 and nearer.any():
        keep[rows] &= margin >= np.quantile(margin[nearer], extra)
    return keep


def fit_router(
    labels: Sequence[str],
    train: Examples,
    validation: Examples,
    spec: RouterSpec,
    features: Features,
    *,
    distance: bool = True,
    progress: bool = True,
) -> tuple[Router, dict[str, Any]]:
    """Fit features + classifier on `train`, calibrate and choose thresholds on `validation`.

    Examples labelled BACKGROUND form the internal out-of-domain class. Returns the router and
    the validation metrics it was tuned to. `progress`: a bar over the stages (the embedding
    passes show their own).
    """
    stages = ["vocabulary", "training features", "classifier", "validation features", "calibration"]
    bar = tqdm(total=len(stages), desc="router: fit", unit="stage", disable=not progress)

    def stage(done: bool = True) -> None:
        if done:
            bar.update(1)
        if bar.n < len(stages):
            bar.set_postfix_str(stages[bar.n])

    stage(done=False)
    labels = list(labels)
    unknown = sorted(set(train.labels) - {*labels, BACKGROUND})
    if unknown:
        raise ConfigError(f"training examples have labels {unknown} that are not router labels {labels}")
    background = BACKGROUND in train.labels
    classes = labels + ([BACKGROUND] if background else [])
    started = time.perf_counter()
    features.fit(train.texts)
    stage()
    y = _targets(classes, train.labels)
    weights = np.asarray(train.weights, dtype=np.float64)  # feedback rows weigh more than a window
    x, emb = features.training_features(train.texts)
    stage()
    fit_rows = (
        purify_background(x, y, len(labels), spec.background_purify)
        if background
        else np.ones(len(y), dtype=bool)
    )
    rows = np.flatnonzero(fit_rows)
    yv = _targets(classes, validation.labels)
    data = HeadData(
        [train.texts[i] for i in rows], y[rows], weights[rows], validation.texts, yv, len(labels), spec
    )
    head = features.fit_head(features.classifier(x[fit_rows], y[fit_rows], weights[fit_rows], spec), data)
    stage()
    router = Router(
        labels,
        features,
        head.coef,
        head.intercept,
        background=background,
        policy=spec.policy,
        fallback_model=spec.fallback_model,
        mixture_top_k=spec.mixture_top_k,
        mixture_min_prob=spec.mixture_min_prob,
    )
    fit_s = time.perf_counter() - started

    # --- calibration on validation windows -------------------------------------------------
    xv, embv = head.validation or features.featurize(validation.texts)
    stage()
    logits = router.logits(xv)
    raw_probs = softmax(logits)
    router.temperature = fit_temperature(logits, yv)
    probs = softmax(logits / router.temperature)

    in_domain = yv < len(labels)
    words = np.array([len(t.split()) for t in validation.texts])
    similarity = np.ones(len(yv), dtype=np.float32)
    if distance and embv is not None:
        if emb is not None:
            router.prototypes = emb[_prototype_rows(train.labels, labels, spec.seed)]
        elif head.embedded is not None:  # the training rows the pipeline embedded itself
            embedded, vectors = head.embedded
            picked = _prototype_rows([classes[t] for t in data.targets[embedded]], labels, spec.seed)
            router.prototypes = vectors[picked]
        else:
            rows = _prototype_rows(train.labels, labels, spec.seed)
            router.prototypes = features.embed([train.texts[i] for i in rows])
        similarity = router.nearest_similarity(embv)
        ref = in_domain & (words >= SIMILARITY_MIN_WORDS)
        if ref.any():
            router.min_similarity = float(np.quantile(similarity[ref], IN_DOMAIN_MISS_RATE))

    ood = router.out_of_domain(probs, similarity)
    expert_probs = probs[:, : len(labels)]
    top = expert_probs.argmax(1)
    conf = expert_probs.max(1)
    correct = top == yv
    keep = in_domain & ~ood
    if spec.threshold is not None:
        router.threshold = spec.threshold
    else:
        router.threshold = choose_threshold(conf[keep], correct[keep], spec.target_accuracy)
    accepted = keep & (conf >= router.threshold)
    stage()
    bar.close()
    raw_conf = raw_probs.max(1)
    metrics: dict[str, Any] = {
        "validation_examples": int(len(yv)),
        "background_kept": float(fit_rows[y == len(labels)].mean()) if background else None,
        "temperature": router.temperature,
        "threshold": router.threshold,
        "min_similarity": router.min_similarity,
        "accuracy_top1": float(correct[in_domain].mean()),
        "accuracy_top1_by_words": {
            str(w): float(correct[in_domain & (words == w)].mean())
            for w in sorted(set(words[in_domain].tolist()))
            if w in spec.window_words
        },
        # All classes (background too): the calibration the temperature was fitted for.
        "ece_before": expected_calibration_error(raw_conf, raw_probs.argmax(1) == yv),
        "ece_after": expected_calibration_error(probs.max(1), probs.argmax(1) == yv),
        "accepted_accuracy": float(correct[accepted].mean()) if accepted.any() else None,
        "coverage": float(accepted[in_domain].mean()),
        "in_domain_out_of_domain_rate": float(ood[in_domain].mean()),
        "background_fallback_rate": float((ood | (conf < router.threshold))[~in_domain].mean())
        if background
        else None,
        "fit_seconds": round(fit_s, 1),
        **head.info,
    }
    log.info(
        "router %s: top-1 %.3f, threshold %.3f (coverage %.3f at accuracy %s), T %.2f, ECE %.3f -> %.3f",
        features.name,
        metrics["accuracy_top1"],
        router.threshold,
        metrics["coverage"],
        metrics["accepted_accuracy"],
        router.temperature,
        metrics["ece_before"],
        metrics["ece_after"],
    )
    return router, metrics


def router_examples(app: AppConfig, labels: Sequence[str]) -> tuple[Examples, Examples]:
    """Train and validation examples of every routable expert (+ background when configured)."""
    spec = app.router
    budget = spec.max_windows_per_expert
    # validation windows are embedded in full: sized by what the encoder sees of training
    val_budget = max(50, int(min(budget, spec.embed_windows_per_expert or budget) * VALIDATION_SHARE))
    train = expert_examples(app, labels, "train", budget)
    validation = expert_examples(app, labels, "validation", val_budget)
    if spec.background:
        bg = background_examples(app, "train", budget, BACKGROUND)
        train.add(bg.texts, BACKGROUND, bg.kinds)
        bgv = background_examples(app, "validation", val_budget, BACKGROUND)
        validation.add(bgv.texts, BACKGROUND, bgv.kinds)
    return train, validation


def _cache_embeddings(app: AppConfig, features: Features) -> EmbeddingCache | None:
    """Put an on-disk embedding cache in front of a frozen encoder (pipelines `embed`, `combined`);
    the tuned pipeline trains its encoder, so its vectors are never cached."""
    embed = features.frozen_embed()
    if embed is None or app.router.encoder_package is None:
        return None
    encoder = embed.encoder
    if not isinstance(encoder, SentenceEncoder):  # already behind a memo (a benchmark's)
        return None
    path = embedding_cache_file(
        app.paths.artifacts_dir / EMBEDDING_CACHE_DIR, app.router.encoder_package, encoder
    )
    cache = EmbeddingCache(encoder, path)
    embed.encoder = cache
    return cache


def _uncache(features: Features, cache: EmbeddingCache) -> None:
    embed = features.frozen_embed()
    if embed is not None:
        embed.encoder = cache.encoder


def train_router(app: AppConfig) -> tuple[Router, dict[str, Any]]:
    """Train, calibrate and save the router for the configured routable experts."""
    labels = routable_labels(app)
    if len(labels) < 2:
        raise ConfigError(f"the router needs at least two routable experts; config has {labels}")
    spec = app.router
    started = time.perf_counter()
    train, validation = router_examples(app, labels)
    feedback = {"used": 0, "skipped": 0}
    if spec.include_feedback:
        rows, feedback = feedback_examples(feedback_path(app), labels, spec.feedback_weight)
        train.extend(rows)
        log.info(
            "router feedback: %d reviewed misroutes at weight %s", feedback["used"], spec.feedback_weight
        )
    counts = {label: train.labels.count(label) for label in sorted(set(train.labels))}
    log.info("router training examples: %s", counts)
    features = build_features(spec.pipeline, spec.encoder_package, app.paths.downloads_dir)
    cache = _cache_embeddings(app, features)
    router, metrics = fit_router(labels, train, validation, spec, features)
    if cache is not None:
        cache.save()
        _uncache(features, cache)  # the router keeps the bare encoder: no memo growing while it serves
        metrics["embedding_cache"] = {"hits": cache.hits, "misses": cache.misses}
    metrics["feedback_rows"] = feedback["used"]  # reviewed misroutes trained on (include_feedback)
    metrics["feedback_rows_skipped"] = feedback["skipped"]  # their label is not a routable expert
    metrics["train_seconds"] = round(time.perf_counter() - started, 1)
    router.info = {
        "config": dataclasses.asdict(spec),
        "train_examples": counts,
        "metrics": metrics,
    }
    out = router_dir(app)
    router.save(out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(spec), indent=1) + "\n")
    return router, metrics


def train_router_command(app: AppConfig, ctx: Any) -> dict[str, Any]:
    """CLI entry: train, save, print a one-screen summary."""
    router, metrics = train_router(app)
    print(f"router ({router.pipeline}) saved to {router_dir(app)}")
    print(f"  labels:          {router.labels}{' + background' if router.background else ''}")
    print(f"  top-1 accuracy:  {metrics['accuracy_top1']:.3f} on validation windows")
    for words, acc in metrics["accuracy_top1_by_words"].items():
        print(f"    {words:>4} words:    {acc:.3f}")
    print(f"  threshold:       {router.threshold:.3f} for accuracy {app.router.target_accuracy}")
    if app.router.include_feedback:
        print(
            f"  feedback:        {metrics['feedback_rows']} reviewed misroutes (weight {app.router.feedback_weight})"
        )
    print(f"  coverage:        {metrics['coverage']:.3f} (accepted accuracy {metrics['accepted_accuracy']})")
    print(
        f"  ECE:             {metrics['ece_before']:.3f} -> {metrics['ece_after']:.3f} (T={router.temperature:.2f})"
    )
    return metrics

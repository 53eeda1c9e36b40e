"""The `fast` pipeline: naive Bayes over TF-IDF on every window + a logistic regression over the
frozen embeddings of a few, mixed into one linear layer (real MiniLM encoder, toy windows)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import MultinomialNB

from experts.config import compose
from experts.errors import ConfigError
from router.calibration import log_softmax
from router.encoder import EmbeddingCache
from router.features import FastFeatures, HeadData
from router.model import BACKGROUND, load_router, router_dir
from router.pipelines import build_features
from router.train import fit_router

from .conftest import LABELS, make_examples

CLASSES = [*LABELS, BACKGROUND]
PER_CLASS = 60
EMBEDDED = 15  # router.embed_windows_per_expert in these tests


@pytest.fixture(scope="module")
def spec():
    return dataclasses.replace(compose(["router=fast"]).router, embed_windows_per_expert=EMBEDDED)


@pytest.fixture(scope="module")
def fitted(spec):
    """The pipeline's two fitting steps called directly, on toy windows, with a memo counting
    what the encoder embedded."""
    app = compose(["router=fast"])
    features = build_features("fast", spec.encoder_package, app.paths.downloads_dir)
    memo = EmbeddingCache(features.frozen_embed().encoder)
    features.frozen_embed().encoder = memo
    train, validation = make_examples(PER_CLASS, seed=0), make_examples(20, seed=1)
    y = np.array([CLASSES.index(label) for label in train.labels])
    yv = np.array([CLASSES.index(label) for label in validation.labels])
    weights = np.ones(len(y))
    features.fit(train.texts)
    x, emb = features.training_features(train.texts)
    assert emb is None  # nothing embedded for the naive Bayes
    head = features.classifier(x, y, weights, spec)
    data = HeadData(train.texts, y, weights, validation.texts, yv, len(LABELS), spec)
    return features, features.fit_head(head, data), data, memo


def test_only_the_budget_of_training_windows_is_embedded(fitted):
    features, head, data, memo = fitted
    rows, vectors = head.embedded
    per_class = np.bincount(data.targets[rows], minlength=len(CLASSES))
    assert per_class.tolist() == [EMBEDDED] * len(CLASSES)
    assert head.info["embedded_windows"] == EMBEDDED * len(CLASSES)
    embedded_texts = {data.texts[i] for i in rows} | set(data.validation_texts)
    assert memo.misses == len(embedded_texts)  # the other training windows never reached the encoder
    np.testing.assert_allclose(vectors, features.embed([data.texts[i] for i in rows]), atol=1e-5)


def test_the_linear_layer_is_the_mix_of_the_two_classifiers(fitted, spec):
    """log-softmax of the router's one linear layer == that of (1 - mix) log P_bayes + mix log P_lr,
    both fitted here by sklearn on the same rows."""
    features, head, data, _ = fitted
    rows, vectors = head.embedded
    x = features.tfidf.transform(data.texts)
    bayes = MultinomialNB(alpha=spec.bayes_alpha, fit_prior=False).fit(x, data.targets)
    lr = LogisticRegression(C=spec.c, max_iter=3000, class_weight="balanced").fit(vectors, data.targets[rows])
    test = make_examples(10, seed=2).texts
    joined, emb = features.featurize(test)
    mix = head.info["mix"]
    assert 0 <= mix <= 1
    expected = (1 - mix) * bayes.predict_log_proba(
        features.tfidf.transform(test)
    ) + mix * lr.predict_log_proba(emb)
    got = np.asarray(joined @ head.coef.T) + head.intercept
    np.testing.assert_allclose(log_softmax(got), log_softmax(expected), atol=2e-3)


def test_fast_router_routes_saves_and_loads(tmp_path, spec):
    app = compose(["router=fast", f"paths.artifacts={tmp_path}"])
    features = build_features("fast", spec.encoder_package, app.paths.downloads_dir)
    assert isinstance(features, FastFeatures)
    router, metrics = fit_router(
        LABELS, make_examples(PER_CLASS, seed=0), make_examples(20, seed=1), spec, features
    )
    assert router.pipeline == "fast" and metrics["accuracy_top1"] > 0.9
    # the nearest-prototype signal reads the embedded windows: EMBEDDED per expert, no background
    assert router.prototypes.shape[0] == EMBEDDED * len(LABELS)
    router.save(router_dir(app))
    loaded = load_router(app, strict=False)
    assert type(loaded.features) is FastFeatures
    test = make_examples(20, seed=3, labels=tuple(LABELS))
    np.testing.assert_allclose(loaded.predict_proba(test.texts), router.predict_proba(test.texts), atol=1e-5)
    decisions = loaded.decide(test.texts, policy="top1")
    assert np.mean([d.expert == label for d, label in zip(decisions, test.labels, strict=True)]) > 0.9


@pytest.mark.parametrize(
    "override, message",
    [
        ("router.bayes_alpha=0", "bayes_alpha"),
        ("router.embed_windows_per_expert=0", "embed_windows_per_expert"),
    ],
)
def test_bad_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        compose(["router=fast", override])

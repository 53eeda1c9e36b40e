"""The `tuned` pipeline: MiniLM fine-tuned on the routing task, mixed with TF-IDF (real encoder)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from experts.config import FineTuneSpec, compose
from router.encoder import ENCODER_MAX_TOKENS, SentenceEncoder
from router.finetune import COSINE_SCALE, TunedFeatures, fine_tune
from router.model import Router
from router.pipelines import build_features
from router.train import fit_router

from .conftest import LABELS, make_examples


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    app = compose(["router=tuned"])
    spec = dataclasses.replace(
        app.router, finetune=FineTuneSpec(epochs=3, max_steps=20, batch_size=16, warmup_steps=2)
    )
    features = build_features("tuned", spec.encoder_package, app.paths.downloads_dir)
    router, metrics = fit_router(LABELS, make_examples(60, seed=0), make_examples(30, seed=1), spec, features)
    return router, metrics, app


def _accuracy(scores: np.ndarray, examples) -> float:
    inside = [i for i, label in enumerate(examples.labels) if label in LABELS]
    gold = np.array([LABELS.index(examples.labels[i]) for i in inside])
    return float((scores[inside, : len(LABELS)].argmax(1) == gold).mean())


def test_both_halves_learn_the_task(tuned):
    router, metrics, _ = tuned
    test = make_examples(30, seed=2)
    features: TunedFeatures = router.features
    x = features.transform(test.texts)
    classes = len(router.classes)
    assert x.shape == (len(test.texts), 2 * classes)
    np.testing.assert_allclose(np.exp(x[:, :classes]).sum(1), 1, atol=1e-4)  # log-posteriors
    assert _accuracy(x[:, :classes], test) > 0.9  # TF-IDF logistic regression
    assert _accuracy(x[:, classes:], test) > 0.6  # the tuned encoder's head alone (chance 1/3)
    assert _accuracy(router.predict_proba(test.texts), test) > 0.9
    assert metrics["finetune_steps"] == 20
    assert metrics["finetune_device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert 0 <= metrics["mix"] <= 1


def test_fine_tuning_moved_the_encoder(tuned):
    router, _, _ = tuned
    frozen = SentenceEncoder(router.features.folder)
    texts = ["what dose of insulin for a patient", "may I sublicense this software"]
    cos = (frozen.encode(texts) * router.features.embed(texts)).sum(1)
    assert (cos < 0.999).all()


def test_save_load_round_trip(tuned, tmp_path):
    router, _, app = tuned
    router.save(tmp_path / "router")
    loaded = Router.load(tmp_path / "router", LABELS, downloads=app.paths.downloads_dir)
    assert loaded.pipeline == "tuned"
    texts = make_examples(10, seed=3).texts
    np.testing.assert_allclose(loaded.predict_proba(texts), router.predict_proba(texts), atol=5e-3)
    assert [d.expert for d in loaded.decide(texts)] == [d.expert for d in router.decide(texts)]


@pytest.mark.gpu
def test_fine_tuning_on_cuda_returns_cpu_weights_that_learned(tuned):
    _, _, app = tuned
    folder = build_features("tuned", app.router.encoder_package, app.paths.downloads_dir).folder
    train = make_examples(60, seed=0)
    targets = np.array([LABELS.index(label) if label in LABELS else len(LABELS) for label in train.labels])
    spec = FineTuneSpec(epochs=3, max_steps=30, batch_size=16, warmup_steps=2)
    result = fine_tune(
        folder, train.texts, targets, np.ones(len(targets)), len(LABELS) + 1, spec,
        max_tokens=ENCODER_MAX_TOKENS, dtype=torch.float32, device="cuda", progress=False,
    )  # fmt: skip
    assert result.device == "cuda" and result.steps == 30
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in result.state.values())
    encoder = SentenceEncoder(
        folder, state={k: v for k, v in result.state.items() if not k.startswith("pooler.")}
    )
    test = make_examples(30, seed=2)
    logits = COSINE_SCALE * encoder.encode(test.texts) @ result.head_weight.T + result.head_bias
    assert _accuracy(logits, test) > 0.6  # chance 1/3

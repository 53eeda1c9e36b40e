"""Router pipelines come from one registry: a new one is a class and an entry, nothing else."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.feature_extraction.text import HashingVectorizer

from experts.config import PackageRef, compose, config_dir
from experts.errors import ArtifactError, ConfigError
from router.features import Features, TfidfFeatures
from router.model import Router, load_router, router_dir
from router.pipelines import PIPELINES, build_features, register_pipeline
from router.train import fit_router

from .conftest import LABELS, make_examples


class HashedWords(Features):
    """Hashed word counts weighted by a per-bucket IDF learned in `fit` (an array in the file)."""

    name = "hashed_words"

    def __init__(self, buckets: int = 512, idf: np.ndarray | None = None):
        self.buckets = buckets
        self.idf = idf
        self._hash = HashingVectorizer(n_features=buckets, alternate_sign=False, norm=None)

    @classmethod
    def build(cls, encoder_package: PackageRef | None, downloads: Path) -> HashedWords:
        return cls()

    @classmethod
    def from_state(
        cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], downloads: Path | None = None
    ) -> HashedWords:
        return cls(int(meta["buckets"]), arrays["hashed.idf"])

    def fit(self, texts: Sequence[str]) -> HashedWords:
        df = np.asarray((self._hash.transform(texts) > 0).sum(axis=0)).ravel()
        self.idf = (np.log((1 + len(texts)) / (1 + df)) + 1).astype(np.float32)
        return self

    def transform(self, texts: Sequence[str]) -> sp.csr_matrix:
        x = self._hash.transform(texts).multiply(self.idf).tocsr().astype(np.float32)
        norm = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
        return sp.diags(1 / np.where(norm > 0, norm, 1)).dot(x).tocsr()

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        assert self.idf is not None
        return {"buckets": self.buckets}, {"hashed.idf": self.idf}


@pytest.fixture
def hashed():
    register_pipeline(HashedWords)
    yield HashedWords
    PIPELINES.pop(HashedWords.name)


def _accuracy(router: Router, n: int, seed: int) -> float:
    test = make_examples(n, seed=seed, labels=tuple(LABELS))
    return float(
        np.mean([d.expert == label for d, label in zip(router.decide(test.texts), test.labels, strict=True)])
    )


def test_a_registered_pipeline_trains_saves_loads_and_routes(hashed, tmp_path):
    app = compose([f"router.pipeline={hashed.name}", f"paths.artifacts={tmp_path}", "router.policy=top1"])
    features = build_features(app.router.pipeline, app.router.encoder_package, app.paths.downloads_dir)
    assert type(features) is hashed
    router, metrics = fit_router(
        LABELS, make_examples(120, seed=0), make_examples(40, seed=1), app.router, features
    )
    assert router.pipeline == hashed.name and metrics["accuracy_top1"] > 0.9
    router.save(router_dir(app))

    loaded = load_router(app, strict=False)  # the path serving and `moe route` take
    assert type(loaded.features) is hashed and loaded.pipeline == hashed.name
    np.testing.assert_array_equal(loaded.features.idf, router.features.idf)
    texts = make_examples(10, seed=3).texts
    np.testing.assert_allclose(loaded.predict_proba(texts), router.predict_proba(texts), atol=1e-6)
    assert _accuracy(loaded, 30, seed=4) > 0.9  # it really routes, not just loads

    PIPELINES.pop(hashed.name)
    try:  # once unregistered, its file is refused like any unknown name
        with pytest.raises(ArtifactError, match=f"router pipeline '{hashed.name}' is unknown"):
            Router.load(router_dir(app))
        with pytest.raises(ConfigError, match=f"unknown router pipeline '{hashed.name}'; available"):
            load_router(app, strict=False)
    finally:
        register_pipeline(hashed)


def test_a_name_is_registered_once(hashed):
    register_pipeline(hashed)  # the same class again: a no-op
    clash = type("OtherTfidf", (TfidfFeatures,), {})
    with pytest.raises(ConfigError, match="router pipeline 'tfidf' is already TfidfFeatures"):
        register_pipeline(clash)
    assert PIPELINES["tfidf"] is TfidfFeatures


def test_an_unknown_pipeline_names_the_known_ones(tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown router pipeline 'tfid'; available: \['combined', 'embed'"
    ):
        build_features("tfid", None, tmp_path)


@pytest.mark.parametrize("yaml", sorted(p.stem for p in (config_dir() / "router").glob("*.yaml")))
def test_every_router_yaml_names_a_registered_pipeline(yaml):
    pipeline = compose([f"router={yaml}"]).router.pipeline
    assert pipeline in PIPELINES and PIPELINES[pipeline].name == pipeline

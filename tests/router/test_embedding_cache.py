"""The router's on-disk embedding cache: a hit gives the stored vector, a miss the encoder's, and
vectors of one encoder are never served for another."""

from __future__ import annotations

import numpy as np
import pytest

from experts.config import compose
from router.encoder import EmbeddingCache, SentenceEncoder, embedding_cache_file, encoder_dir
from router.pipelines import build_features
from router.train import EMBEDDING_CACHE_DIR, _cache_embeddings, _uncache

TEXTS = ["How do I list files in a directory?", "What is the dose of insulin?", "Can I sublicense MIT code?"]


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    import torch

    app = compose(["router=combined"])
    return SentenceEncoder(
        encoder_dir(app.router.encoder_package, app.paths.downloads_dir), dtype=torch.float32
    )


@pytest.mark.integration
def test_cache_hits_misses_and_survives_a_restart(encoder, tmp_path):
    path = tmp_path / "cache.npz"
    cache = EmbeddingCache(encoder, path)
    first = cache.encode([TEXTS[0], TEXTS[1], TEXTS[0]])
    assert (cache.misses, cache.hits) == (2, 1)
    np.testing.assert_allclose(first, encoder.encode([TEXTS[0], TEXTS[1], TEXTS[0]]), atol=1e-5)
    cache.save()

    again = EmbeddingCache(encoder, path)  # a second run: read from disk
    second = again.encode([TEXTS[1], TEXTS[2]])
    assert (again.misses, again.hits) == (1, 1)
    np.testing.assert_array_equal(second[0], first[1])  # the stored vector, bit for bit
    np.testing.assert_allclose(second[1], encoder.encode([TEXTS[2]])[0], atol=1e-5)
    again.save()
    assert len(EmbeddingCache(encoder, path).vectors) == 3


@pytest.mark.integration
def test_unreadable_cache_is_ignored_and_rewritten(encoder, tmp_path):
    path = tmp_path / "cache.npz"
    path.write_bytes(b"not a numpy archive")
    cache = EmbeddingCache(encoder, path)
    assert cache.vectors == {}
    cache.encode(TEXTS[:1])
    cache.save()
    assert list(EmbeddingCache(encoder, path).vectors) == [EmbeddingCache.key(TEXTS[0])]


@pytest.mark.integration
def test_cache_file_is_named_by_the_encoder(encoder, tmp_path):
    import torch

    app = compose(["router=combined"])
    ref = app.router.encoder_package
    other = SentenceEncoder(encoder.folder, dtype=torch.bfloat16)
    assert embedding_cache_file(tmp_path, ref, encoder) != embedding_cache_file(tmp_path, ref, other)
    assert embedding_cache_file(tmp_path, ref, encoder) == embedding_cache_file(tmp_path, ref, encoder)


@pytest.mark.integration
@pytest.mark.parametrize("pipeline", ["tfidf", "tuned", "embed", "combined", "fast"])
def test_training_caches_only_a_frozen_encoder(pipeline, tmp_path):
    app = compose(["router=combined", f"paths.artifacts={tmp_path}"])
    features = build_features(pipeline, app.router.encoder_package, app.paths.downloads_dir)
    cache = _cache_embeddings(app, features)
    if pipeline in ("tfidf", "tuned"):  # no encoder, or one that training changes
        assert cache is None
        return
    embed = features.frozen_embed()
    assert embed.encoder is cache and cache.path.parent == tmp_path / EMBEDDING_CACHE_DIR
    _uncache(features, cache)
    assert isinstance(embed.encoder, SentenceEncoder)

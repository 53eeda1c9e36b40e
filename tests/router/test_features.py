"""The router's own fast feature code equals the library code it replaces."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from experts.config import compose
from router.encoder import SentenceEncoder, encoder_dir
from router.features import CombinedFeatures, TfidfFeatures

from .conftest import make_examples

ODD = ["", "   ", "unknownword zzz", "Ünïcödé straße naïve", "x", "dose dose dose dose", "os.path.join(a, b)"]


def _sklearn_tfidf(features: TfidfFeatures, texts: list[str]) -> sp.csr_matrix:
    return sp.hstack([vec.transform(texts) for vec in features.views.values()], format="csr")


def test_tfidf_transform_equals_sklearn():
    texts = make_examples(40, seed=0).texts
    features = TfidfFeatures().fit(texts)
    queries = make_examples(10, seed=3).texts + ODD
    ours, reference = features.transform(queries), _sklearn_tfidf(features, queries)
    assert ours.shape == reference.shape and ours.dtype == np.float32 and ours.has_sorted_indices
    assert abs(ours - reference).max() < 1e-6
    assert ours[len(queries) - len(ODD)].nnz == 0  # the empty text has no features


def test_tfidf_round_trip_keeps_the_fast_transform():
    features = TfidfFeatures().fit(make_examples(40, seed=0).texts)
    loaded = TfidfFeatures.from_state(*features.state())
    queries = make_examples(5, seed=4).texts + ODD
    assert abs(loaded.transform(queries) - features.transform(queries)).max() < 1e-6


def test_combined_join_equals_hstack():
    features = TfidfFeatures().fit(make_examples(40, seed=0).texts)
    tfidf = features.transform(make_examples(3, seed=5).texts + ODD)
    emb = np.random.default_rng(0).normal(size=(tfidf.shape[0], 8)).astype(np.float32)
    combined = CombinedFeatures(features, embed=None)  # join needs no encoder
    joined = combined.join(tfidf, emb)
    reference = sp.hstack([tfidf, sp.csr_matrix(emb * CombinedFeatures.EMBED_WEIGHT)], format="csr")
    assert joined.shape == reference.shape and joined.has_sorted_indices
    assert abs(joined - reference).max() == 0


@pytest.mark.integration
def test_sentence_encoder_equals_transformers_bert():
    """Our BERT forward pass gives transformers' embeddings (the MiniLM wheel, offline cache)."""
    import torch
    from transformers import AutoModel

    app = compose(["router=combined"])
    folder = encoder_dir(app.router.encoder_package, app.paths.downloads_dir)
    encoder = SentenceEncoder(folder, batch_size=4, dtype=torch.float32)
    texts = ["How do I list files in a directory?", "x", *ODD[2:], "word " * 100]  # padding, truncation
    model = AutoModel.from_pretrained(folder).eval()
    with torch.inference_mode():
        batch = encoder.tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        reference = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(encoder.encode(texts), reference, atol=1e-5)
    np.testing.assert_allclose(encoder.encode(texts[:1]), reference[:1], atol=1e-5)  # one query, no mask


@pytest.mark.integration
def test_bfloat16_encoder_stays_close_to_float32():
    """Where the CPU has native bfloat16 the router encodes in it: same embeddings to cos 0.9999."""
    import torch

    app = compose(["router=combined"])
    folder = encoder_dir(app.router.encoder_package, app.paths.downloads_dir)
    texts = ["How do I list files in a directory?", "What is the dose of insulin?", *ODD[2:], "word " * 100]
    full = SentenceEncoder(folder, dtype=torch.float32).encode(texts)
    half = SentenceEncoder(folder, dtype=torch.bfloat16).encode(texts)
    assert half.dtype == np.float32 and (full * half).sum(1).min() > 0.999

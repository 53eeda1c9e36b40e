"""Tiny synthetic routing data: three 'experts' and a background class with their own words."""

from __future__ import annotations

import random

import pytest

from experts.config import RouterSpec
from router.data import Examples
from router.features import TfidfFeatures
from router.model import BACKGROUND
from router.train import fit_router

LABELS = ["biomedical", "legal", "python_docs"]
VOCAB = {
    "biomedical": [
        "patient",
        "clinical",
        "dose",
        "tumour",
        "gene",
        "therapy",
        "trial",
        "disease",
        "insulin",
        "cohort",
    ],
    "legal": [
        "licence",
        "copyright",
        "warranty",
        "distribute",
        "software",
        "licensee",
        "terms",
        "liability",
        "notice",
        "sublicense",
    ],
    "python_docs": [
        "def",
        "import",
        "module",
        "function",
        "class",
        "asyncio",
        "list",
        "tuple",
        "dict",
        "iterator",
    ],
    BACKGROUND: [
        "football",
        "weather",
        "recipe",
        "holiday",
        "movie",
        "music",
        "travel",
        "garden",
        "concert",
        "match",
    ],
}
COMMON = ["the", "a", "of", "and", "to", "in", "is", "what", "how", "does"]
# The settings the toy routers were written for (the defaults are the tuned pipeline's).
TOY_SPEC = RouterSpec(
    pipeline="tfidf", target_accuracy=0.95, window_words=(4, 8, 16, 32, 64, 128), background_purify=0.0
)


def make_examples(n: int, seed: int, labels: tuple[str, ...] = (*LABELS, BACKGROUND)) -> Examples:
    """`n` texts of 4-20 words per label: mostly the label's own words, some shared ones."""
    rng = random.Random(seed)
    out = Examples()
    for label in labels:
        words = VOCAB[label] + COMMON
        texts = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 20))) for _ in range(n)]
        out.add(texts, label, ["w"] * n)
    return out


@pytest.fixture(scope="session")
def toy_examples():
    """make_examples(n, seed): synthetic labelled texts (tests build their own sets)."""
    return make_examples


@pytest.fixture(scope="session")
def toy_router():
    """A TF-IDF router with a background class, trained in about a second."""
    router, metrics = fit_router(
        LABELS, make_examples(150, seed=0), make_examples(60, seed=1), TOY_SPEC, TfidfFeatures()
    )
    router.info = {"metrics": metrics}
    return router

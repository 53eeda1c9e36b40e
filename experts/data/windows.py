"""Query-like text windows: short runs of words cut from documents, for router training and eval.

A user's query is a few words to a paragraph; windows of several sizes drawn from each document
teach the router (and measure it) on inputs of that shape.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def query_windows(
    texts: Sequence[str], sizes: Sequence[int], per_doc: int, seed: int
) -> list[tuple[int, str]]:
    """`per_doc` windows per text, each `N` consecutive words with N drawn from `sizes`.

    Returns (index of the source text, window) pairs, in text order; a text shorter than N words
    gives itself whole. Deterministic for a given seed; empty texts give nothing.
    """
    if not sizes or min(sizes) <= 0:
        raise ValueError(f"sizes must be positive word counts, got {list(sizes)}")
    if per_doc < 0:
        raise ValueError(f"per_doc must be >= 0, got {per_doc}")
    rng = random.Random(seed)
    out: list[tuple[int, str]] = []
    for i, text in enumerate(texts):
        words = text.split()
        if not words:
            continue
        for _ in range(per_doc):
            size = rng.choice(sizes)
            start = rng.randrange(len(words) - size + 1) if len(words) > size else 0
            out.append((i, " ".join(words[start : start + size])))
    return out

"""Split by document with a stable hash, then chunk long documents inside their split.

A document's split depends only on its split key (its group, else its doc_id) and the fractions:
the same document lands in the same split on every run and machine, and chunking happens after
the split, so no document (or licence family) is ever on both sides of a split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from experts.data.readers import Document

SPLITS = ("train", "validation", "test")
_SALT = "moe-split-v1:"  # changing it reshuffles every corpus; keep it fixed


def split_of(key: str, fractions: Sequence[float]) -> str:
    """'train', 'validation' or 'test' for a split key, from the first 8 bytes of its sha256."""
    u = int.from_bytes(hashlib.sha256((_SALT + key).encode()).digest()[:8], "big") / 2**64
    edge = 0.0
    for name, fraction in zip(SPLITS, fractions, strict=True):
        edge += fraction
        if u < edge:
            return name
    return SPLITS[-1]


def assign_splits(docs: Sequence[Document], fractions: Sequence[float]) -> dict[str, list[Document]]:
    """Documents per split; documents sharing a `group` share a split."""
    out: dict[str, list[Document]] = {name: [] for name in SPLITS}
    for doc in docs:
        out[split_of(doc.group or doc.doc_id, fractions)].append(doc)
    # A small corpus can leave validation or test empty by chance; an empty split cannot be
    # evaluated (or even reloaded by `datasets`). Move one whole split unit over from train,
    # chosen by its hash so the choice is as stable as the split itself.
    for name in SPLITS[1:]:
        units = sorted({d.group or d.doc_id for d in out["train"]}, key=_unit_rank)
        if not out[name] and len(units) > 1:
            moved = units[-1]
            out[name] = [d for d in out["train"] if (d.group or d.doc_id) == moved]
            out["train"] = [d for d in out["train"] if (d.group or d.doc_id) != moved]
    return out


def _unit_rank(key: str) -> bytes:
    return hashlib.sha256((_SALT + "rank:" + key).encode()).digest()


def chunk_text(text: str, max_words: int) -> list[str]:
    """Cut a text into pieces of at most ~max_words words, on paragraph (then line, then word)
    boundaries; a text that fits stays whole."""
    if len(text.split()) <= max_words:
        return [text]
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for para in _pieces(text, max_words):
        n = len(para.split())
        if current and size + n > max_words:
            chunks.append("\n\n".join(current))
            current, size = [], 0
        current.append(para)
        size += n
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def _pieces(text: str, max_words: int) -> list[str]:
    """Paragraphs, with any paragraph longer than max_words cut by lines, then by words."""
    out: list[str] = []
    for para in text.split("\n\n"):
        if len(para.split()) <= max_words:
            out.append(para)
            continue
        lines: list[str] = []
        for line in para.split("\n"):
            words = line.split()
            if len(words) > max_words:
                lines.extend(" ".join(words[i : i + max_words]) for i in range(0, len(words), max_words))
            else:
                lines.append(line)
        block: list[str] = []
        size = 0
        for line in lines:
            n = len(line.split())
            if block and size + n > max_words:
                out.append("\n".join(block))
                block, size = [], 0
            block.append(line)
            size += n
        if block:
            out.append("\n".join(block))
    return out

"""Cleaning: normalise, drop boilerplate, too-short and non-text documents, exact and near duplicates.

Every step counts what it removed; the counts go into the corpus card. Order matters: exact
duplicates are removed before the (slower) MinHash pass, and near-duplicates keep the first copy
seen, so a run is deterministic for a given reader order.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import replace

from tqdm.auto import tqdm

from experts.data.readers import Document

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\u200e\u200f\ufeff]")
_SPACES = re.compile(r"(?<=\S)[ \t\u00a0]{2,}")  # runs inside a line (justified man pages); indentation stays
_TAG = re.compile(r"</?[a-zA-Z][\w:-]*(?:\s[^<>]*)?/?>")
# Lines that carry no content in any corpus: rules and underlines, copyright and rights notices.
_BOILERPLATE = re.compile(
    r"^\s*(?:[-=~^*#+_.:|<>/\\]{3,}"
    r"|(?:copyright\s*)?(?:\(c\)|©)\s*(?:\d{4}|<?year>?).{0,120}"
    r"|copyright\s+(?:\(c\)\s*)?\d{4}.{0,120}"
    r"|all rights reserved\.?"
    r"|this article is protected by copyright\..*"
    r"|\[?(?:page|p\.)\s*\d+\]?)\s*$",
    re.IGNORECASE,
)
NUM_PERM = 128  # MinHash permutations: ~4% error on the estimated Jaccard similarity
SHINGLE_WORDS = 5


def normalise(text: str) -> str:
    """NFKC unicode, no control characters, single spaces inside lines, at most one blank line."""
    text = unicodedata.normalize("NFKC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text).replace("\t", "    ")
    lines = [_SPACES.sub(" ", line).rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def strip_markup(text: str) -> str:
    """Remove HTML/XML tags (their text stays) and unescape entities."""
    import html

    return html.unescape(_TAG.sub("", text))


def drop_boilerplate(text: str) -> tuple[str, int]:
    """Text without boilerplate lines, and how many lines went."""
    kept, dropped = [], 0
    for line in text.split("\n"):
        if line.strip() and _BOILERPLATE.match(line):
            dropped += 1
        else:
            kept.append(line)
    return "\n".join(kept), dropped


def is_text(text: str, min_alpha_ratio: float) -> bool:
    """Enough letters among the non-space characters (tables, hex dumps and code listings fail)."""
    chars = [c for c in text if not c.isspace()]
    return bool(chars) and sum(c.isalpha() for c in chars) / len(chars) >= min_alpha_ratio


def exact_key(text: str) -> str:
    """Identity of a text up to case and whitespace."""
    return hashlib.sha1(" ".join(text.lower().split()).encode()).hexdigest()


def shingles(text: str, size: int = SHINGLE_WORDS) -> set[bytes]:
    """Word n-grams of a lower-cased text (the whole text when shorter than n words)."""
    words = re.findall(r"\w+", text.lower())
    if len(words) <= size:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + size]).encode() for i in range(len(words) - size + 1)}


def near_duplicates(texts: Sequence[str], threshold: float, progress: bool = False) -> set[int]:
    """Indices of texts whose MinHash Jaccard similarity to an earlier kept text is >= threshold."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    # One set of permutations for all (drawing them per text costs more than hashing it), and
    # crc32 instead of the default sha1: faster, and 32 bits are all the scheme uses anyway.
    template = MinHash(num_perm=NUM_PERM, seed=1)
    kept: dict[str, MinHash] = {}
    dropped: set[int] = set()
    for i, text in enumerate(tqdm(texts, desc="near-duplicates", unit="doc", disable=not progress or None)):
        mh = MinHash(
            num_perm=NUM_PERM, permutations=template.permutations, scheme=template.scheme, hashfunc=zlib.crc32
        )
        mh.update_batch(list(shingles(text)))
        # LSH candidates are approximate: confirm with the estimated similarity.
        if any(kept[key].jaccard(mh) >= threshold for key in lsh.query(mh)):
            dropped.add(i)
            continue
        kept[str(i)] = mh
        lsh.insert(str(i), mh)
    return dropped


def clean_documents(
    docs: Iterable[Document],
    min_chars: int,
    near_dup_threshold: float,
    min_alpha_ratio: float = 0.5,
    max_documents: int | None = None,
    progress: bool = False,
) -> tuple[list[Document], dict]:
    """Cleaned documents and a report: documents read, kept, and per step what it removed
    (documents; lines for `boilerplate_lines`)."""
    read = 0
    removed = {
        "boilerplate_lines": 0,
        "too_short": 0,
        "non_text": 0,
        "exact_duplicate": 0,
        "near_duplicate": 0,
        "over_max_documents": 0,
    }
    seen_keys: set[str] = set()
    seen_ids: dict[str, int] = {}
    out: list[Document] = []
    for doc in tqdm(docs, desc="read+clean", unit="doc", disable=not progress or None):
        read += 1
        text, n_lines = drop_boilerplate(normalise(doc.text))
        removed["boilerplate_lines"] += n_lines
        text = text.strip()
        if len(text) < min_chars:
            removed["too_short"] += 1
            continue
        if not is_text(text, min_alpha_ratio):
            removed["non_text"] += 1
            continue
        key = exact_key(text)
        if key in seen_keys:
            removed["exact_duplicate"] += 1
            continue
        seen_keys.add(key)
        # doc ids must be unique (a source may repeat one, e.g. a PMID in two dumps)
        n = seen_ids.get(doc.doc_id, 0)
        seen_ids[doc.doc_id] = n + 1
        doc_id = doc.doc_id if n == 0 else f"{doc.doc_id}#{n + 1}"
        out.append(replace(doc, doc_id=doc_id, text=text, title=normalise(doc.title)))
    near = near_duplicates([d.text for d in out], near_dup_threshold, progress=progress)
    removed["near_duplicate"] = len(near)
    out = [d for i, d in enumerate(out) if i not in near]
    if max_documents is not None and len(out) > max_documents:
        # a stable sample over the whole source, not its first files
        ranked = sorted(range(len(out)), key=lambda i: hashlib.sha1(out[i].doc_id.encode()).hexdigest())
        keep = set(ranked[:max_documents])
        removed["over_max_documents"] = len(out) - max_documents
        out = [d for i, d in enumerate(out) if i in keep]
    return out, {"read": read, "kept": len(out), "removed": removed}

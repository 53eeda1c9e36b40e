"""Retrieval grounding: a TF-IDF index over an expert's training corpus, saved without pickle.

An expert with `serving.retrieval: true` answers with the top-k passages of its own corpus in the
prompt. The index is built from the *train* split only (the held-out splits stay held out) and
lives in `artifacts/data/<slug>/index/` beside the corpus it was built from:

    vocabulary.json   term -> column, plus the vectorizer settings and the corpus fingerprint
    matrix.safetensors  idf (float32) and the L2-normalised passage x term CSR matrix
    passages.jsonl    one {doc_id, title, text} per row of the matrix

Nothing is unpickled on load: JSON and safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from experts.atomic import replace_dir
from experts.config import AppConfig, ExpertSpec, PathsSpec
from experts.errors import ArtifactError

log = logging.getLogger(__name__)

INDEX_VERSION = 1
# English stop words: a question's "what does the ... do" must not dominate its score.
_VECTORIZER = {
    "lowercase": True,
    "stop_words": "english",
    "sublinear_tf": True,
    "token_pattern": r"(?u)\b\w\w+\b",
}


@dataclass(frozen=True)
class Passage:
    """One retrieved passage: where it comes from, its text and its cosine score."""

    doc_id: str
    title: str
    snippet: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def index_dir(paths: PathsSpec, slug: str) -> Path:
    """Where the index of expert `slug` lives."""
    return paths.data_dir(slug) / "index"


def _windows(text: str, words: int) -> list[str]:
    """Split a corpus row into passages of about `words` words (the last one may be shorter)."""
    tokens = text.split()
    if len(tokens) <= words * 1.5:  # a short tail reads better glued to its window
        return [" ".join(tokens)] if tokens else []
    out = [" ".join(tokens[i : i + words]) for i in range(0, len(tokens), words)]
    if len(out) > 1 and len(out[-1].split()) < words // 3:
        out[-2] = out[-2] + " " + out.pop()
    return out


def _vectorizer(vocabulary: dict[str, int] | None = None, max_features: int | None = None) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(vocabulary=vocabulary, max_features=max_features, dtype=np.float32, **_VECTORIZER)


class RetrievalIndex:
    """A loaded index: `search(query, k)` returns the k best passages by cosine similarity."""

    def __init__(
        self, slug: str, vocabulary: dict[str, int], idf: np.ndarray, matrix: Any, passages: list[dict]
    ):
        if matrix.shape != (len(passages), len(vocabulary)) or idf.shape != (len(vocabulary),):
            raise ArtifactError(
                f"retrieval index of {slug!r} is inconsistent: matrix {matrix.shape}, "
                f"{len(passages)} passages, {len(vocabulary)} terms, idf {idf.shape}; run `moe index expert={slug}`"
            )
        self.slug = slug
        self.passages = passages
        self.matrix = matrix.tocsr()
        self._vec = _vectorizer(vocabulary)
        self._vec.idf_ = idf  # the fitted state is vocabulary + idf: nothing else to restore

    def __len__(self) -> int:
        return len(self.passages)

    def search(self, query: str, k: int = 3) -> list[Passage]:
        """The `k` passages most similar to `query` (fewer if fewer share a term with it)."""
        if k <= 0 or not query.strip():
            return []
        q = self._vec.transform([query])
        if q.nnz == 0:
            return []
        scores = (self.matrix @ q.T).toarray().ravel()
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [
            Passage(
                doc_id=self.passages[i]["doc_id"],
                title=self.passages[i]["title"],
                snippet=self.passages[i]["text"],
                score=float(scores[i]),
            )
            for i in top
            if scores[i] > 0
        ]


def fingerprint(paths: PathsSpec, slug: str) -> str:
    """A hash of the corpus card: it changes whenever `moe data` rebuilds the corpus differently."""
    card = paths.data_dir(slug) / "card.json"
    return hashlib.sha256(card.read_bytes()).hexdigest()[:16] if card.exists() else "unknown"


def build_index_from_rows(
    rows: list[dict[str, Any]], out: Path, *, slug: str, chunk_words: int = 120, corpus: str = "unknown"
) -> Path:
    """Index rows with `doc_id`, `text` and optionally `title`; write the three files to `out`."""
    from safetensors.numpy import save_file

    passages = [
        {"doc_id": str(r["doc_id"]), "title": str(r.get("title") or ""), "text": w}
        for r in rows
        for w in _windows(str(r["text"]), chunk_words)
    ]
    if not passages:
        raise ArtifactError(f"expert {slug!r}: no text to index in its train split")
    vec = _vectorizer(max_features=200_000)
    # The title is part of what a passage is about: "fork" should find fork(2)'s page.
    matrix = vec.fit_transform([f"{p['title']} {p['text']}" for p in passages]).tocsr()
    matrix.sort_indices()
    vocabulary = {term: int(col) for term, col in vec.vocabulary_.items()}
    meta = {
        "version": INDEX_VERSION,
        "expert": slug,
        "kind": "tfidf",
        "vectorizer": _VECTORIZER,
        "chunk_words": chunk_words,
        "passages": len(passages),
        "documents": len({p["doc_id"] for p in passages}),
        "corpus": corpus,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "vocabulary": vocabulary,
    }
    arrays = {
        "idf": vec.idf_.astype(np.float32),
        "data": matrix.data.astype(np.float32),
        "indices": matrix.indices.astype(np.int64),
        "indptr": matrix.indptr.astype(np.int64),
        "shape": np.asarray(matrix.shape, dtype=np.int64),
    }
    with replace_dir(out) as staged:  # a reader never sees half an index
        (staged / "vocabulary.json").write_text(json.dumps(meta))
        save_file(arrays, str(staged / "matrix.safetensors"))
        with (staged / "passages.jsonl").open("w") as f:
            for p in passages:
                f.write(json.dumps(p) + "\n")
    return out


def build_index(app: AppConfig, spec: ExpertSpec) -> Path:
    """Build expert `spec`'s index from its corpus train split; return the index folder."""
    from experts.data import load_corpus

    train = load_corpus(spec.name, app.paths)["train"]
    titles = train["title"] if "title" in train.column_names else [""] * len(train)
    rows = [
        {"doc_id": d, "title": t, "text": x}
        for d, t, x in zip(train["doc_id"], titles, train["text"], strict=True)
    ]
    return build_index_from_rows(
        rows,
        index_dir(app.paths, spec.name),
        slug=spec.name,
        chunk_words=spec.serving.retrieval_chunk_words,
        corpus=fingerprint(app.paths, spec.name),
    )


def load_index_dir(folder: Path, slug: str = "") -> RetrievalIndex:
    """Load an index folder written by `build_index_from_rows` (JSON + safetensors only)."""
    from safetensors.numpy import load_file
    from scipy.sparse import csr_matrix

    slug = slug or folder.parent.name
    files = [folder / n for n in ("vocabulary.json", "matrix.safetensors", "passages.jsonl")]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise ArtifactError(
            f"no retrieval index for {slug!r} at {folder} (missing {missing}); run `moe index expert={slug}`"
        )
    try:
        meta = json.loads(files[0].read_text())
        arrays = load_file(str(files[1]))
        passages = [json.loads(line) for line in files[2].read_text().splitlines() if line.strip()]
    except (json.JSONDecodeError, OSError, ValueError) as exc:
        raise ArtifactError(
            f"retrieval index of {slug!r} at {folder} is corrupt ({exc}); run `moe index expert={slug}`"
        ) from None
    if meta.get("version") != INDEX_VERSION:
        raise ArtifactError(
            f"retrieval index of {slug!r} has version {meta.get('version')}, expected {INDEX_VERSION}; rebuild it"
        )
    shape = tuple(int(x) for x in arrays["shape"])
    matrix = csr_matrix((arrays["data"], arrays["indices"], arrays["indptr"]), shape=shape)
    return RetrievalIndex(slug, meta["vocabulary"], arrays["idf"], matrix, passages)


def load_index(app: AppConfig, slug: str) -> RetrievalIndex:
    """Load expert `slug`'s index; warns when its corpus was rebuilt after the index."""
    folder = index_dir(app.paths, slug)
    index = load_index_dir(folder, slug)
    built_from = json.loads((folder / "vocabulary.json").read_text()).get("corpus")
    current = fingerprint(app.paths, slug)
    if built_from not in ("unknown", current) and current != "unknown":
        log.warning("retrieval index of %r predates its corpus; run `moe index expert=%s`", slug, slug)
    return index


def load_retrievers(app: AppConfig) -> dict[str, RetrievalIndex]:
    """The index of every expert whose `serving.retrieval` is true (serving loads these once).

    A missing index is an error naming the command that builds it, not a silent ungrounded answer.
    """
    return {s.name: load_index(app, s.name) for s in app.experts if s.serving.retrieval}


def grounded_prompt(question: str, passages: list[Passage], max_chars: int = 700) -> str:
    """The question preceded by numbered sources; without passages it is the question alone.

    Each snippet is cut to `max_chars` so k passages fit the serving prompt limit.
    """
    if not passages:
        return question
    lines = ["Use these sources to answer the question; cite them as [n]."]
    for i, p in enumerate(passages, 1):
        snippet = (
            p.snippet if len(p.snippet) <= max_chars else p.snippet[:max_chars].rsplit(" ", 1)[0] + " ..."
        )
        lines.append(f"[{i}] {p.title}: {snippet}" if p.title else f"[{i}] {snippet}")
    lines.append(f"\nQuestion: {question}")
    return "\n".join(lines)


def index_command(app: AppConfig, ctx: Any) -> list[Path]:
    """`moe index [expert=<slug>|expert=all]`: build retrieval indexes from the train splits.

    Without an expert (or with expert=all) every expert that has a corpus of its own is indexed
    (the generalist's mixture has none); serving uses the index where `serving.retrieval` is true.
    """
    specs = [app.expert] if app.expert is not None else [s for s in app.experts if s.data.source != "mixture"]
    built = []
    for spec in specs:
        t = time.perf_counter()
        folder = build_index(app, spec)
        meta = json.loads((folder / "vocabulary.json").read_text())
        print(
            f"{spec.name:<14} {meta['documents']:>6} docs {meta['passages']:>7} passages "
            f"{len(meta['vocabulary']):>7} terms  {time.perf_counter() - t:5.1f}s  {folder}"
        )
        built.append(folder)
    return built

"""Feature pipelines of the router: TF-IDF n-grams, MiniLM sentence embeddings, or both.

A pipeline is one `Features` subclass: it turns texts into a feature matrix and is written as
plain data (a JSON-able dict plus named numpy arrays for safetensors), so a saved router never
needs pickle. `router.pipelines.PIPELINES` names them; training, loading, evaluation, the CLI and
serving all find a pipeline there, and reach it only through this class's methods. The `tuned`
pipeline (an encoder fine-tuned on the routing task) lives in `router.finetune`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import MultinomialNB

from experts.config import PackageRef, RouterSpec
from experts.errors import ConfigError
from router.calibration import log_softmax
from router.encoder import Encoder, default_downloads, load_encoder

MIX_GRID = np.round(np.arange(0.0, 1.01, 0.1), 2)  # weights of the second classifier tried on validation


@dataclass
class Head:
    """The router's linear layer over a pipeline's features (classes x features, classes) and what
    fitting it learned (`info`, saved with the router's metrics). `validation`: the validation
    features (`Features.featurize`) when a pipeline computed them already while fitting."""

    coef: np.ndarray
    intercept: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    validation: tuple[Any, np.ndarray | None] | None = None
    # (rows of HeadData.texts, their unit embeddings): a pipeline that embedded only some training
    # rows hands them over for the nearest-prototype signal instead of embedding more
    embedded: tuple[np.ndarray, np.ndarray] | None = None


@dataclass(frozen=True)
class HeadData:
    """What `Features.fit_head` may learn from: the training rows the classifier was fitted on
    (targets index the router's classes: experts first, then the background class if any) and
    the validation set."""

    texts: Sequence[str]
    targets: np.ndarray
    weights: np.ndarray
    validation_texts: Sequence[str]
    validation_targets: np.ndarray
    experts: int
    spec: RouterSpec


class Features(ABC):
    """A router pipeline: a fitted text -> matrix transform that can be saved as JSON + arrays.

    Adding one is a subclass (a `name`, `build`, `transform`, `state`, `from_state`; the other
    methods have defaults) plus its entry in `router.pipelines.PIPELINES`.
    """

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def build(cls, encoder_package: PackageRef | None, downloads: Path) -> Features:
        """An unfitted pipeline from config (`router.encoder_package`, the download cache)."""

    @classmethod
    @abstractmethod
    def from_state(
        cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], downloads: Path | None = None
    ) -> Features:
        """The pipeline `state()` wrote (`downloads`: where an encoder wheel is cached)."""

    @abstractmethod
    def transform(self, texts: Sequence[str]) -> Any:
        """The (n, features) matrix of `texts`, dense or sparse."""

    @abstractmethod
    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """JSON-able metadata and named arrays (no pickle) that `from_state` reads back."""

    def fit(self, texts: Sequence[str]) -> Features:
        """Learn what the transform needs (vocabularies) from the training texts."""
        return self

    def featurize(self, texts: Sequence[str]) -> tuple[Any, np.ndarray | None]:
        """The feature matrix and, for a pipeline with a sentence encoder, the texts' unit
        embeddings (computed once; the router's nearest-prototype distance signal reads them)."""
        return self.transform(texts), None

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit embeddings of `texts` (pipelines whose `featurize` returns embeddings)."""
        raise ConfigError(f"router pipeline {self.name!r} has no sentence encoder")

    def training_features(self, texts: Sequence[str]) -> tuple[Any, np.ndarray | None]:
        """What the logistic regression is fitted on in training (default: `featurize`)."""
        return self.featurize(texts)

    def classifier(self, x: Any, y: np.ndarray, weights: np.ndarray, spec: RouterSpec) -> Head:
        """The linear layer fitted on the training features: a multinomial logistic regression
        (balanced classes, `router.c`)."""
        return Head(*logistic_regression(x, y, weights, spec.c))

    def fit_head(self, head: Head, data: HeadData) -> Head:
        """Called with the fitted classifier: a pipeline that trains more (an encoder)
        does it here and returns the head to use over its features. Default: keep it."""
        return head

    def frozen_embed(self) -> EmbedFeatures | None:
        """The part that embeds with a frozen encoder (training caches its vectors), if any."""
        return None


def logistic_regression(
    x: Any, y: np.ndarray, weights: np.ndarray, c: float
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression (balanced classes): coef [classes, features], intercept."""
    clf = LogisticRegression(C=c, max_iter=3000, class_weight="balanced")
    clf.fit(x, y, sample_weight=weights)
    coef, intercept = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # binary: one score z; softmax over (-z/2, z/2) gives sigmoid(z)
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    return coef, intercept


def choose_mix(xv: np.ndarray, yv: np.ndarray, experts: int, classes: int) -> float:
    """The weight of the second of two classifiers' log-posteriors, xv = [first | second]
    (n x 2 * classes), with the best in-domain validation accuracy (ties: the value nearest 0.5)."""
    inside = yv < experts
    first, second = xv[:, :classes], xv[:, classes:]
    scores = []
    for mix in MIX_GRID:
        top = ((1 - mix) * first + mix * second)[inside, :experts].argmax(1)
        scores.append((float((top == yv[inside]).mean()), -abs(mix - 0.5), float(mix)))
    return max(scores)[2]


def needs_encoder(name: str, encoder_package: PackageRef | None) -> PackageRef:
    """The encoder package of a pipeline that embeds, or a ConfigError naming the setting."""
    if encoder_package is None:
        raise ConfigError(f"router.pipeline {name!r} needs router.encoder_package (the MiniLM wheel)")
    return encoder_package


# --------------------------------------------------------------------------------------------
# TF-IDF
# --------------------------------------------------------------------------------------------
# Word uni/bigrams carry topic; character n-grams carry the style of short, odd inputs
# (`fork()`, `os.path`, `§ 2(b)`) and survive typos and unseen inflections.
_TFIDF_VIEWS: dict[str, dict[str, Any]] = {
    "word": {"analyzer": "word", "ngram_range": (1, 2), "token_pattern": r"(?u)\b\w[\w.]*\b"},
    "char": {"analyzer": "char_wb", "ngram_range": (2, 5)},
}
_TFIDF_COMMON = {"lowercase": True, "sublinear_tf": True, "min_df": 2, "dtype": np.float32}
_TFIDF_MAX_FEATURES = 150_000  # per view; keeps the saved router a few MB


def _tfidf_view(view: str) -> TfidfVectorizer:
    return TfidfVectorizer(**_TFIDF_VIEWS[view], **_TFIDF_COMMON, max_features=_TFIDF_MAX_FEATURES)


class TfidfFeatures(Features):
    """Word and character n-gram TF-IDF, side by side (each view L2-normalised).

    sklearn fits the vocabularies and IDF; `transform` is our own, equal to sklearn's to float32
    rounding (tests/router/test_features.py) and much faster on one query, where sklearn's
    per-call validation and matrix assembly cost more than the n-grams themselves.
    """

    name = "tfidf"

    def __init__(self) -> None:
        self.views = {view: _tfidf_view(view) for view in _TFIDF_VIEWS}
        self._lookup: list[tuple[Any, dict[str, int], np.ndarray, int]] = []

    def fit(self, texts: Sequence[str]) -> TfidfFeatures:
        for vec in self.views.values():
            vec.fit(texts)
        self._prepare()
        return self

    def _prepare(self) -> None:
        """Per view: the n-gram analyzer, vocabulary, IDF and the view's first column."""
        self._lookup, offset = [], 0
        for vec in self.views.values():
            idf = np.asarray(vec.idf_, dtype=np.float32)
            self._lookup.append((vec.build_analyzer(), vec.vocabulary_, idf, offset))
            offset += len(idf)
        self.n_features = offset

    def transform(self, texts: Sequence[str]) -> sp.csr_matrix:
        """(n, features) float32 CSR: per view sublinear TF x IDF, L2-normalised, views side by side."""
        n = len(texts)
        rows, cols, vals = [], [], []
        for analyze, vocab, idf, offset in self._lookup:
            r: list[int] = []
            c: list[int] = []
            tf: list[int] = []
            for i, text in enumerate(texts):
                counts = Counter(vocab[g] for g in analyze(text) if g in vocab)
                r.extend([i] * len(counts))
                c.extend(counts)
                tf.extend(counts.values())
            row, col = np.asarray(r, dtype=np.int64), np.asarray(c, dtype=np.int64)
            val = (1.0 + np.log(np.asarray(tf, dtype=np.float32))) * idf[col]
            norm = np.sqrt(np.bincount(row, weights=val * val, minlength=n)).astype(np.float32)
            val /= np.where(norm > 0, norm, 1.0)[row]
            rows.append(row)
            cols.append(col + offset)
            vals.append(val)
        row, col, val = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
        order = np.lexsort((col, row))
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(row, minlength=n), out=indptr[1:])
        return sp.csr_matrix((val[order], col[order], indptr), shape=(n, self.n_features))

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta, arrays = {}, {}
        for view, vec in self.views.items():
            vocab = sorted(vec.vocabulary_, key=vec.vocabulary_.__getitem__)
            meta[view] = vocab
            arrays[f"tfidf.{view}.idf"] = np.asarray(vec.idf_, dtype=np.float32)
        return {"vocabulary": meta}, arrays

    @classmethod
    def build(cls, encoder_package: PackageRef | None, downloads: Path) -> TfidfFeatures:
        return cls()

    @classmethod
    def from_state(
        cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], downloads: Path | None = None
    ) -> TfidfFeatures:
        self = cls()
        for view, vec in self.views.items():
            vocab = meta["vocabulary"][view]
            vec.vocabulary_ = {term: i for i, term in enumerate(vocab)}
            vec.idf_ = arrays[f"tfidf.{view}.idf"].astype(np.float64)
        self._prepare()
        return self


# --------------------------------------------------------------------------------------------
# Sentence embeddings (all-MiniLM-L6-v2, frozen: router.encoder)
# --------------------------------------------------------------------------------------------
class EmbedFeatures(Features):
    """MiniLM sentence embeddings. The encoder is frozen: only its package pin is saved."""

    name = "embed"

    def __init__(self, encoder: Encoder, package: PackageRef):
        self.encoder = encoder
        self.package = package

    @classmethod
    def build(cls, encoder_package: PackageRef | None, downloads: Path) -> EmbedFeatures:
        ref = needs_encoder(cls.name, encoder_package)
        return cls(load_encoder(ref, downloads), ref)

    @classmethod
    def from_state(
        cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], downloads: Path | None = None
    ) -> EmbedFeatures:
        ref = PackageRef(**meta["encoder_package"])
        return cls(load_encoder(ref, downloads or default_downloads()), ref)

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.encode(texts)

    def featurize(self, texts: Sequence[str]) -> tuple[Any, np.ndarray | None]:
        emb = self.transform(texts)
        return emb, emb

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.transform(texts)

    def frozen_embed(self) -> EmbedFeatures | None:
        return self

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"encoder_package": self.package.__dict__}, {}


class CombinedFeatures(Features):
    """TF-IDF and embeddings in one sparse matrix; the embedding block is scaled to weigh in."""

    name = "combined"
    # Each TF-IDF view and the embedding are unit vectors; a larger embedding weight lets the
    # linear model lean on it for short questions, where n-grams are sparse.
    EMBED_WEIGHT = 2.0

    def __init__(self, tfidf: TfidfFeatures, embed: EmbedFeatures):
        self.tfidf = tfidf
        self.embed_features = embed

    @classmethod
    def build(cls, encoder_package: PackageRef | None, downloads: Path) -> CombinedFeatures:
        return cls(TfidfFeatures(), EmbedFeatures.build(needs_encoder(cls.name, encoder_package), downloads))

    @classmethod
    def from_state(
        cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], downloads: Path | None = None
    ) -> CombinedFeatures:
        return cls(TfidfFeatures.from_state(meta, arrays), EmbedFeatures.from_state(meta, arrays, downloads))

    def fit(self, texts: Sequence[str]) -> CombinedFeatures:
        self.tfidf.fit(texts)
        return self

    def transform(self, texts: Sequence[str]) -> sp.csr_matrix:
        return self.featurize(texts)[0]

    def featurize(self, texts: Sequence[str]) -> tuple[Any, np.ndarray | None]:
        emb = self.embed_features.transform(texts)
        return self.join(self.tfidf.transform(texts), emb), emb

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.embed_features.transform(texts)

    def frozen_embed(self) -> EmbedFeatures | None:
        return self.embed_features

    def join(self, tfidf: sp.csr_matrix, emb: np.ndarray) -> sp.csr_matrix:
        """[tfidf | EMBED_WEIGHT * emb] as CSR, assembled directly (sp.hstack costs more than the
        classifier on one query)."""
        n, dim = emb.shape
        row_nnz = np.diff(tfidf.indptr)
        indptr = tfidf.indptr + np.arange(n + 1) * dim
        indices = np.empty(indptr[-1], dtype=np.int64)
        data = np.empty(indptr[-1], dtype=np.float32)
        sparse_at = np.arange(tfidf.nnz) + np.repeat(np.arange(n) * dim, row_nnz)
        indices[sparse_at], data[sparse_at] = tfidf.indices, tfidf.data
        dense_at = (tfidf.indptr[1:] + np.arange(n) * dim)[:, None] + np.arange(dim)
        indices[dense_at] = tfidf.shape[1] + np.arange(dim)
        data[dense_at] = emb * self.EMBED_WEIGHT
        return sp.csr_matrix((data, indices, indptr), shape=(n, tfidf.shape[1] + dim))

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta, arrays = self.tfidf.state()
        meta.update(self.embed_features.state()[0])
        return meta, arrays


class FastFeatures(CombinedFeatures):
    """`combined`'s features and file ([TF-IDF | EMBED_WEIGHT * embedding], one linear layer),
    fitted the way that is both cheaper and better on short questions (docs/router.md):

    - multinomial naive Bayes (uniform class prior, `router.bayes_alpha`) over the TF-IDF block of
      every training window: it fits in about a second, so it can read many windows;
    - a logistic regression over the frozen embeddings of at most `router.embed_windows_per_expert`
      training windows per class (embedding is what costs time);
    - the two log-posteriors mixed with the weight best on validation windows. A row's log
      normalisers shift all its classes alike, so the mix is one linear layer over the features.
    """

    name = "fast"

    def training_features(self, texts: Sequence[str]) -> tuple[Any, np.ndarray | None]:
        return self.tfidf.transform(texts), None  # the embeddings of a subset come in `fit_head`

    def classifier(self, x: Any, y: np.ndarray, weights: np.ndarray, spec: RouterSpec) -> Head:
        bayes = MultinomialNB(alpha=spec.bayes_alpha, fit_prior=False).fit(x, y, sample_weight=weights)
        return Head(bayes.feature_log_prob_, np.zeros(len(bayes.classes_)))

    def fit_head(self, head: Head, data: HeadData) -> Head:
        spec = data.spec
        classes = len(head.intercept)
        rng = np.random.default_rng(spec.seed)
        budget = spec.embed_windows_per_expert
        rows = np.sort(
            np.concatenate(
                [rng.permutation(np.flatnonzero(data.targets == c))[:budget] for c in range(classes)]
            )
        )
        emb = self.embed([data.texts[i] for i in rows])
        coef, intercept = logistic_regression(emb, data.targets[rows], data.weights[rows], spec.c)
        tfidf_v = self.tfidf.transform(data.validation_texts)
        emb_v = self.embed(data.validation_texts)
        lexical = np.asarray(tfidf_v @ head.coef.T) + head.intercept
        semantic = emb_v @ coef.T + intercept
        both = np.hstack([log_softmax(lexical), log_softmax(semantic)])
        mix = choose_mix(both, data.validation_targets, data.experts, classes)
        return Head(
            np.hstack([(1 - mix) * head.coef, (mix / self.EMBED_WEIGHT) * coef]),
            (1 - mix) * head.intercept + mix * intercept,
            {"mix": mix, "embedded_windows": len(rows)},
            (self.join(tfidf_v, emb_v), emb_v),
            (rows, emb),
        )

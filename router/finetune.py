"""Fine-tune the router's sentence encoder on the routing task (router pipeline `tuned`).

all-MiniLM-L6-v2 is trained end to end with a linear head on its pooled, L2-normalised
embedding (a cosine classifier, as in `SentenceEncoder.encode`) over the same labelled windows
the logistic regressions see: classes balanced, each row's sample weight respected (reviewed
misroutes weigh more). On 8-word test windows the frozen encoder + logistic regression reaches
~0.83 and the tuned one ~0.88 (docs/benchmarks.md, Router). Trains on the GPU when torch sees one
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

from experts.config import FineTuneSpec

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
    batches = []
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

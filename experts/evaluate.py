"""Token-level perplexity on fixed token blocks: the same tokens for every model compared."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# forward(input_ids [B, L], attention_mask [B, L], rows) -> log-probabilities or logits [B, L, V]
Forward = Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor]


def block_nll(
    forward: Forward,
    blocks: torch.Tensor,
    batch_size: int = 8,
    logprobs: bool = False,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed next-token NLL and token count per block -> tensor [n_blocks, 2].

    `forward` returns logits (or log-probabilities when `logprobs`); `labels` may mask tokens with -100.
    """
    out = []
    for start in range(0, len(blocks), batch_size):
        rows = slice(start, start + batch_size)
        ids = blocks[rows]
        target = (labels[rows] if labels is not None else ids)[:, 1:]
        scores = forward(ids, torch.ones_like(ids), rows)[:, :-1].float()
        logp = scores if logprobs else torch.log_softmax(scores, dim=-1)
        mask = target != -100
        picked = logp.gather(-1, target.clamp(min=0).to(logp.device).unsqueeze(-1)).squeeze(-1)
        nll = -(picked * mask.to(picked.device)).sum(dim=1)
        out.append(torch.stack([nll.cpu(), mask.sum(dim=1).float()], dim=1))
    return torch.cat(out) if out else torch.zeros(0, 2)


def perplexity(nll: torch.Tensor) -> float:
    """Perplexity from a [n, 2] (summed NLL, tokens) tensor."""
    tokens = float(nll[:, 1].sum())
    return math.exp(float(nll[:, 0].sum()) / tokens) if tokens else float("nan")

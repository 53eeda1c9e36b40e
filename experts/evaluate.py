"""Token-level perplexity on fixed token blocks: the same tokens for every model compared."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# forward(input_ids [B, L], attention_mask [B, L], rows) -> log-probabilities or logits [B, L, V]
Forward = Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor]


def observed_logprobs(
    forward: Forward,
    blocks: torch.Tensor,
    batch_size: int = 8,
    logprobs: bool = False,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every observed next token [n_blocks, T-1] (0 where masked), and the mask.

    `forward` returns logits (or log-probabilities when `logprobs`); `labels` may mask tokens with -100.
    """
    picks, masks = [], []
    for start in range(0, len(blocks), batch_size):
        rows = slice(start, start + batch_size)
        ids = blocks[rows]
        target = (labels[rows] if labels is not None else ids)[:, 1:]
        scores = forward(ids, torch.ones_like(ids), rows)[:, :-1].float()
        logp = scores if logprobs else torch.log_softmax(scores, dim=-1)
        mask = target != -100
        picked = logp.gather(-1, target.clamp(min=0).to(logp.device).unsqueeze(-1)).squeeze(-1)
        picks.append((picked * mask.to(picked.device)).cpu())
        masks.append(mask.cpu())
    if not picks:
        return torch.zeros(0, 0), torch.zeros(0, 0, dtype=torch.bool)
    return torch.cat(picks), torch.cat(masks)


def block_nll(
    forward: Forward,
    blocks: torch.Tensor,
    batch_size: int = 8,
    logprobs: bool = False,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed next-token NLL and token count per block -> tensor [n_blocks, 2] (`observed_logprobs`' arguments)."""
    picked, mask = observed_logprobs(forward, blocks, batch_size, logprobs, labels)
    return torch.stack([-picked.sum(dim=1), mask.sum(dim=1).float()], dim=1)


def perplexity(nll: torch.Tensor) -> float:
    """Perplexity from a [n, 2] (summed NLL, tokens) tensor."""
    tokens = float(nll[:, 1].sum())
    return math.exp(float(nll[:, 0].sum()) / tokens) if tokens else float("nan")

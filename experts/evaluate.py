"""Token-level perplexity on fixed token blocks: the same tokens for every model compared."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

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


def chat_example(
    tokenizer: Any, system: str, prompt: str, response: str, max_len: int
) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one exchange in the chat format the endpoint uses (system + user
    message, the generation prompt, then the response and EOS), cut at `max_len`; labels -100 on
    all but the response."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    p_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return (p_ids + r_ids)[:max_len], ([-100] * len(p_ids) + r_ids)[:max_len]


def sequence_logprobs(
    forward: Callable[[torch.Tensor, torch.Tensor, list[int]], torch.Tensor],
    examples: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 8,
    logprobs: bool = False,
    pad_id: int = 0,
) -> torch.Tensor:
    """Summed log-probability of each example's labelled tokens and their count -> [n, 2].

    Examples of different lengths are batched by length and padded on the right (masked);
    `forward(ids, mask, indices)` gets the examples' indices, for per-example adapters or mixtures."""
    out = torch.zeros(len(examples), 2)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(examples[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            x, y = examples[i]
            ids[row, : len(x)], labels[row, : len(y)], mask[row, : len(x)] = (
                torch.tensor(x),
                torch.tensor(y),
                1,
            )
        scores = forward(ids, mask, idx)[:, :-1].float()
        logp = scores if logprobs else torch.log_softmax(scores, dim=-1)
        target = labels[:, 1:].to(logp.device)
        keep = target != -100
        picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
        out[idx, 0] = picked.sum(dim=1).cpu()
        out[idx, 1] = keep.sum(dim=1).float().cpu()
    return out

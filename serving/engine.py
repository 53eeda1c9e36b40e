"""Batched decoding over the expert pool: one forward pass per step for every request in a batch.

Requests for different experts (and posterior-weighted mixtures of several) share each forward
pass: every request is expanded into one row per expert it mixes (`Expansion`), rows run with
their own adapter (peft `adapter_names`), and the rows of one request are mixed back into one
next-token distribution. Prompts are left-padded; the attention mask and position ids make the
padding invisible, so a request decodes the same tokens alone or in a batch (greedy, fp32).
A KV cache holds the expanded rows; finished requests are dropped from it.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from experts.adapters import Expansion, ExpertPool


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. temperature 0 = greedy."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # HF convention: > 1 discourages tokens already seen
    stop: tuple[str, ...] = ()  # generation ends before the first occurrence of any of these
    ignore_eos: bool = False  # decode exactly max_tokens (benchmarks; vLLM's extension of the API)


@dataclass(frozen=True)
class GenerationRequest:
    """Token ids of a prompt, the experts whose mixture answers it, and how to sample."""

    prompt_ids: tuple[int, ...]
    experts: Mapping[str, float]  # expert slug (or "base") -> weight; one entry = one adapter
    params: SamplingParams = field(default_factory=SamplingParams)
    # slug -> (adapter folder, version): a replica that lacks this version loads it first, so
    # experts added or retrained while serving reach every replica without a restart.
    adapters: Mapping[str, tuple[str, float]] = field(default_factory=dict)


def adapter_version(folder: Path) -> float:
    """The version of an adapter on disk: its weights' modification time."""
    return (folder / "adapter_model.safetensors").stat().st_mtime


@dataclass(frozen=True)
class Delta:
    """What one decoding step added to one request."""

    text: str  # new text since the previous delta (may be empty while a character is incomplete)
    completion_tokens: int  # tokens generated so far
    finish_reason: str | None = None  # "stop" (EOS or a stop string) | "length" | None


def _linear_gemv(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() == x.shape[-1]:
        y = torch.mv(self.weight, x.reshape(-1))
        return (y if self.bias is None else y + self.bias).view(*x.shape[:-1], -1)
    return F.linear(x, self.weight, self.bias)


def use_gemv(model: torch.nn.Module) -> None:
    """Single-row bf16 linears on CPU through `torch.mv`: F.linear's path for one row reads the
    weight at ~16 GB/s here, `mv` at ~29 GB/s (batch-1 decoding is all single rows)."""
    for module in model.modules():
        if type(module) is torch.nn.Linear and "forward" not in module.__dict__:
            module.forward = types.MethodType(_linear_gemv, module)


def _eos_ids(pool: ExpertPool) -> set[int]:
    ids = {pool.tokenizer.eos_token_id}
    config = getattr(pool.model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra])
    return {int(i) for i in ids if i is not None}


def _sample(logp: torch.Tensor, params: Sequence[SamplingParams], seen: Sequence[list[int]]) -> list[int]:
    """Next token per row from mixed log-probabilities [n, V]."""
    logp = logp.float()
    for row, (p, tokens) in enumerate(zip(params, seen, strict=True)):
        if p.repetition_penalty != 1.0 and tokens:
            idx = torch.tensor(sorted(set(tokens)), device=logp.device)
            vals = logp[row, idx]
            # log-probabilities are <= 0: multiplying pushes seen tokens down (HF's rule for negatives)
            logp[row, idx] = torch.where(vals < 0, vals * p.repetition_penalty, vals / p.repetition_penalty)
    out = logp.argmax(-1)
    for row, p in enumerate(params):
        if p.temperature <= 0:
            continue
        probs = torch.softmax(logp[row] / p.temperature, -1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < p.top_p  # smallest prefix reaching top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        out[row] = torch.multinomial(probs, 1)[0]
    return out.tolist()


class _Text:
    """Incremental detokenisation of one request, with stop strings."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = []
        self.emitted = ""

    def push(self, token: int | None, final: bool) -> tuple[str, bool]:
        """Add a token (None: nothing more); return (new text, hit a stop string)."""
        if token is not None:
            self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        stopped = False
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                text, stopped = text[:at], True
        if not (final or stopped) and text.endswith("\ufffd"):
            return "", False  # half of a multi-byte character: wait for the rest
        new = text[len(self.emitted) :]  # text already sent cannot be taken back
        self.emitted += new
        return new, stopped


def decode(pool: ExpertPool, requests: Sequence[GenerationRequest]) -> Iterator[list[Delta | None]]:
    """Decode a batch step by step; each step yields one entry per request, `None` once it finished.

    The caller must keep pulling until the iterator ends (it owns no other resources).
    """
    n = len(requests)
    if n == 0:
        return
    for r in requests:
        if not r.prompt_ids:
            raise ValueError("a prompt needs at least one token")
    exp = Expansion.of([dict(r.experts) for r in requests])
    pool.validate(exp.adapters)
    eos = _eos_ids(pool)
    pad = pool.tokenizer.pad_token_id if pool.tokenizer.pad_token_id is not None else min(eos)
    width = max(len(r.prompt_ids) for r in requests)
    with torch.inference_mode():
        ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        mask, positions = exp.expand(mask), exp.expand(positions)
        # The last column as an index tensor, not logits_to_keep=1: slicing gives a strided
        # [rows, 1, H] view that torch multiplies by copying the vocab matrix once per row.
        last = torch.tensor([width - 1])
        out = pool.forward(exp.expand(ids), mask, exp.adapters, None, positions, logits_to_keep=last)
        cache = out.past_key_values
        logp = exp.mix(out.logits[:, -1])
    texts = [_Text(pool.tokenizer, r.params.stop) for r in requests]
    seen = [list(r.prompt_ids) if r.params.repetition_penalty != 1.0 else [] for r in requests]
    active = list(range(n))  # request indices still decoding, in row order
    while True:
        with torch.inference_mode():
            tokens = _sample(logp, [requests[i].params for i in active], [seen[i] for i in active])
        step: list[Delta | None] = [None] * n
        keep: list[int] = []  # positions in `active` that go on
        for j, (i, token) in enumerate(zip(active, tokens, strict=True)):
            is_eos = token in eos and not requests[i].params.ignore_eos
            generated = len(texts[i].tokens) + (0 if is_eos else 1)
            at_limit = generated >= requests[i].params.max_tokens
            new, stopped = texts[i].push(None if is_eos else token, final=is_eos or at_limit)
            finish = "stop" if (is_eos or stopped) else ("length" if at_limit else None)
            step[i] = Delta(new, len(texts[i].tokens), finish)
            if finish is None:
                keep.append(j)
                if requests[i].params.repetition_penalty != 1.0:
                    seen[i].append(token)
        yield step
        if not keep:
            return
        with torch.inference_mode():
            if len(keep) < len(active):  # drop finished requests' rows from the batch and the cache
                rows = torch.tensor([r for r, owner in enumerate(exp.owner) if owner in keep])
                cache.batch_select_indices(rows.to(pool.device))
                mask, positions = mask[rows], positions[rows]
                active = [active[j] for j in keep]
                tokens = [tokens[j] for j in keep]
                exp = Expansion.of([dict(requests[i].experts) for i in active])
            step_ids = exp.expand(torch.tensor(tokens).view(-1, 1))
            mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype)], dim=1)
            positions = positions[:, -1:] + 1
            out = pool.forward(step_ids, mask, exp.adapters, cache, positions, logits_to_keep=1)
            cache = out.past_key_values
            logp = exp.mix(out.logits[:, -1])


def generate(pool: ExpertPool, requests: Sequence[GenerationRequest]) -> list[tuple[str, int, str]]:
    """Decode a batch to the end: (text, completion tokens, finish reason) per request."""
    texts = [""] * len(requests)
    result: list[tuple[str, int, str]] = [("", 0, "length")] * len(requests)
    for step in decode(pool, requests):
        for i, delta in enumerate(step):
            if delta is not None:
                texts[i] += delta.text
                result[i] = (texts[i], delta.completion_tokens, delta.finish_reason or "length")
    return result

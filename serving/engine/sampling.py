"""Sampling the next token from mixed log-probabilities, and detokenising a request's tokens
incrementally with its stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from experts.adapters import ExpertPool
from serving.engine.requests import SamplingParams


def eos_ids(pool: ExpertPool) -> set[int]:
    ids = {pool.tokenizer.eos_token_id}
    config = getattr(pool.model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra])
    return {int(i) for i in ids if i is not None}


def sample(
    logp: torch.Tensor, params: Sequence[SamplingParams], seen: Sequence[list[int]]
) -> list[int | Exception]:
    """Next token per row from mixed log-probabilities [n, V]; a row that cannot be sampled gets
    its exception instead (that request ends with it, the others go on)."""
    logp = logp.float()
    picks: list[int | Exception] = [0] * len(params)
    broken = torch.isnan(logp).any(-1).tolist()
    for row, (p, tokens) in enumerate(zip(params, seen, strict=True)):
        if broken[row]:
            picks[row] = FloatingPointError("the model produced NaN log-probabilities for this request")
        elif p.repetition_penalty != 1.0 and tokens:
            try:
                idx = torch.tensor(sorted(set(tokens)), device=logp.device)
                vals = logp[row, idx]
                # log-probabilities are <= 0: multiplying pushes seen tokens down (HF's rule for negatives)
                logp[row, idx] = torch.where(
                    vals < 0, vals * p.repetition_penalty, vals / p.repetition_penalty
                )
            except Exception as exc:  # one request's bad input must not end the batch
                picks[row] = exc
    greedy = logp.argmax(-1).tolist()
    for row, p in enumerate(params):
        if isinstance(picks[row], Exception):
            continue
        if p.temperature <= 0:
            picks[row] = greedy[row]
            continue
        try:
            probs = torch.softmax(logp[row] / p.temperature, -1)
            if p.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(-1) - sorted_p < p.top_p  # smallest prefix reaching top_p
                probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
            picks[row] = int(torch.multinomial(probs, 1)[0])
        except Exception as exc:  # e.g. a NaN distribution from a NaN temperature: this row only
            picks[row] = exc
    return picks


class Text:
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
        if not (final or stopped):
            if text.endswith("\ufffd"):
                return "", False  # half of a multi-byte character: wait for the rest
            # Hold back an end that may be the start of a stop string (OpenAI never sends any of it).
            held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - held]
        new = text[len(self.emitted) :]  # text already sent cannot be taken back
        self.emitted += new
        return new, stopped

"""What the engine takes and gives: a request (prompt ids, the experts that answer it, how to
sample), the delta each decoding step adds to it, and the pacing of those deltas into messages."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


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
    # False: the caller wants the whole text only, so a server sends it in one piece at the end
    # (`paced`) instead of one message every `serve.stream_interval_s`. `decode` always steps token by token.
    stream: bool = True


def adapter_version(folder: Path) -> float:
    """The version of an adapter on disk: its weights' modification time."""
    return (folder / "adapter_model.safetensors").stat().st_mtime


@dataclass(frozen=True)
class Delta:
    """What one decoding step added to one request."""

    text: str  # new text since the previous delta (may be empty while a character is incomplete)
    completion_tokens: int  # tokens generated so far
    finish_reason: str | None = None  # "stop" (EOS or a stop string) | "length" | "error" | None
    error: Exception | None = None  # why this request failed (finish_reason "error"); the batch goes on


def coalesce(deltas: Sequence[Delta]) -> Delta:
    """Consecutive deltas of one request as one: their text, the last count and finish reason, an error."""
    last = deltas[-1]
    error = next((d.error for d in deltas if d.error is not None), None)
    return Delta("".join(d.text for d in deltas), last.completion_tokens, last.finish_reason, error)


async def paced(
    deltas: AsyncIterator[Delta], interval_s: float, clock: Callable[[], float] = time.monotonic
) -> AsyncIterator[Delta]:
    """One request's deltas as the messages that carry them: the first at once (a refusal
    surfaces before any byte), an error at once, otherwise what came since the last message once
    `interval_s` has passed (0: every delta; inf: the rest in one at the end), coalesced."""
    held: list[Delta] = []
    sent: float | None = None  # when the last message left
    async for delta in deltas:
        held.append(delta)
        now = clock()
        if sent is None or delta.error is not None or now - sent >= interval_s:
            yield coalesce(held)
            held, sent = [], now
    if held:
        yield coalesce(held)

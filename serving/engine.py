"""Batched decoding over the expert pool: one forward pass per step for every request in a batch.

Requests for different experts (and posterior-weighted mixtures of several) share each forward
pass: every request is expanded into one row per expert it mixes (`Expansion`), rows run with
their own adapter (`serving.decoder`: the pool's stacked LoRA, or peft `adapter_names`), and the
rows of one request are mixed back into one next-token distribution. Prompts are left-padded; the
attention mask and position ids make the padding invisible, so a request decodes the same tokens
alone or in a batch (greedy, fp32). A KV cache holds the expanded rows; finished requests are
dropped from it. A request that fails (a bad input, an adapter that does not load, a distribution
that cannot be sampled) ends alone with its error; the rest of its batch decodes on.
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from experts.adapters import Expansion, ExpertPool
from experts.hardware import CpuInfo
from serving.api import RequestError
from serving.decoder import FastBatch, HFBatch, linear, prefers_mv, start_batch
from serving.packed import is_adapter_module, pack_model

log = logging.getLogger(__name__)


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


def _linear_gemv(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


def use_gemv(model: torch.nn.Module) -> bool:
    """Single-row linears on the CPU through `torch.mv` where that reads this model's weights
    faster than F.linear's single-row path (`serving.decoder.prefers_mv`: it depends on the CPU;
    batch-1 decoding is all single rows). Returns whether it did."""
    linears = [  # the base model's (an adapter's own LoRA linears are small, and fp32)
        m
        for path, m in model.named_modules()
        if type(m) is torch.nn.Linear and "forward" not in m.__dict__ and not is_adapter_module(path)
    ]
    if not prefers_mv([m.weight for m in linears]):
        return False
    for module in linears:
        module.forward = types.MethodType(_linear_gemv, module)
    return True


def serving_weights(pool: ExpertPool, base_weights: str = "auto", cpu: CpuInfo | None = None) -> None:
    """Base weights in the pool's compute dtype: decoding reads every weight once per step, so half
    the bytes in bf16 (autocast alone would keep fp32 weights and cast them at every step). The
    LoRA stack stays fp32: it is small, and small fp32 matmuls are the fast ones on a CPU.

    base_weights, for a pool on the CPU (`serving.packed`): "onednn" holds the decoder layers'
    linears of a bf16 pool in oneDNN's blocked bf16 layout (the same values); "int4" at 4 bits
    where that is lossless (a base converted from a 4-bit GGUF, as the default is); "bf16" stores
    an fp32 pool's in bf16 and computes in fp32 (a CPU without native bf16: half the bytes a
    token); "plain" keeps them as they are; "auto" tries the format `serving.packed.auto_format`
    names for the pool's dtype on this CPU (`cpu`, default this machine's) and keeps it where one
    row through it is faster than through the plain weights here."""
    allowed = {torch.bfloat16: ("auto", "onednn", "int4"), torch.float32: ("auto", "bf16", "int4")}
    with pool.lock:
        if pool.device == "cpu" and base_weights in allowed.get(pool.dtype, ()):
            packed = pack_model(pool.model, base_weights, pool.dtype, cpu)  # from the fp32 weights
            if base_weights == "int4" and not packed:
                log.warning(
                    "base_weights=int4: no layer's weights are on a 4-bit grid (not a 4-bit GGUF?): kept plain"
                )
        elif base_weights not in ("auto", "plain"):
            log.warning(
                "base_weights=%s does not fit a %s pool on %s: kept plain",
                base_weights,
                str(pool.dtype).removeprefix("torch."),
                pool.device,
            )
        if pool.dtype == torch.float32:
            return
        for name, param in pool.model.named_parameters():
            if "lora_" not in name and param.dtype != pool.dtype:
                param.data = param.data.to(pool.dtype)
        if pool.device == "cpu":
            use_gemv(pool.model)  # the HF path's single rows


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


def _eos_ids(pool: ExpertPool) -> set[int]:
    ids = {pool.tokenizer.eos_token_id}
    config = getattr(pool.model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra])
    return {int(i) for i in ids if i is not None}


def _sample(
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
        if not (final or stopped):
            if text.endswith("\ufffd"):
                return "", False  # half of a multi-byte character: wait for the rest
            # Hold back an end that may be the start of a stop string (OpenAI never sends any of it).
            held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - held]
        new = text[len(self.emitted) :]  # text already sent cannot be taken back
        self.emitted += new
        return new, stopped


def check_request(pool: ExpertPool, request: GenerationRequest) -> None:
    """Refuse a request this pool cannot decode (each request alone: the others in its batch go on)."""
    if not request.prompt_ids:
        raise RequestError("a prompt needs at least one token", param="prompt")
    vocab = pool.model.get_input_embeddings().weight.shape[0]  # peft's LoRA Embedding has no num_embeddings
    outside = [t for t in request.prompt_ids if not 0 <= t < vocab]
    if outside:
        raise RequestError(
            f"prompt token id {outside[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt"
        )
    try:
        experts = Expansion.of([dict(request.experts)]).adapters
    except ValueError as exc:  # weights that are not positive
        raise RequestError(str(exc)) from exc
    pool.validate(experts)


def load_adapters(
    pool: ExpertPool, requests: Sequence[GenerationRequest], versions: dict[str, float]
) -> dict[int, Exception]:
    """Load the adapter versions the requests name that the pool lacks (experts added or retrained
    while serving); `versions` (expert -> loaded version) is updated. Returns request index -> error
    for the requests whose adapter failed to load: only those fail, and the version loaded before
    (if any) stays loaded."""
    failed: dict[str, Exception] = {}
    errors: dict[int, Exception] = {}
    for i, request in enumerate(requests):
        for name, (folder, version) in request.adapters.items():
            if name not in failed and versions.get(name) != version:
                try:
                    pool.add(name, Path(folder))
                except Exception as exc:  # a loading boundary: fails the requests that need it
                    log.error("request needs adapter %s from %s: %s", name, folder, exc)
                    failed[name] = exc
                else:
                    versions[name] = version
                    log.info("loaded adapter %s from %s", name, folder)
            if name in failed:
                errors.setdefault(i, failed[name])
    return errors


def loaded_versions(pool: ExpertPool) -> dict[str, float]:
    """Expert -> version of the adapter the pool has loaded (`load_adapters` keeps it current)."""
    return {name: adapter_version(folder) for name, folder in pool.adapters.items()}


def open_batch(
    pool: ExpertPool, requests: Sequence[GenerationRequest], versions: dict[str, float]
) -> Iterator[list[Delta | None]]:
    """`decode` of a batch after loading the adapter versions it names that the pool lacks."""
    return decode(pool, requests, load_adapters(pool, requests, versions))


class Decoding:
    """One batch decoding, a step at a time (`decode` is its iterator). `absorb` takes another
    running batch's requests in, so that both decode in one forward pass per step from then on
    (iteration-level batching: the engine process merges a batch that arrives into a running one).

    Failures are per request: a request in `failed`, one `check_request` refuses, or one whose next
    token cannot be sampled gets a Delta with finish_reason "error" and its exception, and the
    others decode on. (A failing forward pass fails the batch: it is shared.) fast=False decodes
    through the Hugging Face model and peft even where the lean decoder could.
    """

    def __init__(
        self,
        pool: ExpertPool,
        requests: Sequence[GenerationRequest],
        failed: Mapping[int, Exception] | None = None,
        fast: bool = True,
    ):
        self.pool, self.fast = pool, fast
        self.requests = list(requests)
        self.errors: dict[int, Exception] = dict(failed or {})
        for i, r in enumerate(self.requests):
            if i not in self.errors:
                try:
                    check_request(pool, r)
                except Exception as exc:  # this request only
                    self.errors[i] = exc
        self.active = [i for i in range(len(self.requests)) if i not in self.errors]  # in row order
        self.eos = _eos_ids(pool)
        self.texts = [_Text(pool.tokenizer, r.params.stop) for r in self.requests]
        self.seen = [list(r.prompt_ids) if r.params.repetition_penalty != 1.0 else [] for r in self.requests]
        self.tokens: list[int] = []  # each active request's next input token
        self.batch: FastBatch | HFBatch | None = None  # after the first step
        self.exp = self._expansion()
        self.done = False

    def _expansion(self) -> Expansion:
        """The batch's rows: each active request's experts, in order."""
        return Expansion.of([dict(self.requests[i].experts) for i in self.active])

    @property
    def rows(self) -> int:
        return len(self.exp.owner)

    def step(self) -> list[Delta | None] | None:
        """The next step: one entry per request (`None` once it finished); None once all did."""
        if self.done:
            return None
        step: list[Delta | None] = [None] * len(self.requests)
        if self.batch is None:  # the first step: refusals, the prefill and the first token
            for i, error in self.errors.items():
                step[i] = Delta("", 0, "error", error)
            if not self.active:
                self.done = True
                return step if step else None
            logp = self._prefill()
        else:
            with torch.inference_mode():
                tokens = self.exp.expand(torch.tensor(self.tokens).view(-1, 1))
                logp = self.exp.mix(self.batch.step(tokens))
        self._sample(logp, step)
        return step

    def _prefill(self) -> torch.Tensor:
        live = [self.requests[i] for i in self.active]
        pad = self.pool.tokenizer.pad_token_id
        pad = pad if pad is not None else min(self.eos)
        width = max(len(r.prompt_ids) for r in live)
        with torch.inference_mode():
            ids = torch.full((len(live), width), pad, dtype=torch.long)
            mask = torch.zeros((len(live), width), dtype=torch.long)
            for row, r in enumerate(live):
                ids[row, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
                mask[row, width - len(r.prompt_ids) :] = 1
            capacity = width + max(r.params.max_tokens for r in live)
            exp = self.exp
            self.batch = start_batch(
                self.pool, exp.expand(ids), exp.expand(mask), exp.adapters, capacity, self.fast
            )
            return exp.mix(self.batch.prefill())

    def _sample(self, logp: torch.Tensor, step: list[Delta | None]) -> None:
        """Each active request's next token into `step`; the finished ones leave the batch."""
        with torch.inference_mode():
            picks = _sample(
                logp, [self.requests[i].params for i in self.active], [self.seen[i] for i in self.active]
            )
        keep: list[int] = []  # positions in `active` that go on
        self.tokens = [0] * len(self.active)
        for j, (i, pick) in enumerate(zip(self.active, picks, strict=True)):
            try:
                if isinstance(pick, Exception):
                    raise pick
                params = self.requests[i].params
                is_eos = pick in self.eos and not params.ignore_eos
                generated = len(self.texts[i].tokens) + (0 if is_eos else 1)
                at_limit = generated >= params.max_tokens
                new, stopped = self.texts[i].push(None if is_eos else pick, final=is_eos or at_limit)
            except Exception as exc:  # this request ends with its error; the batch goes on
                step[i] = Delta("", len(self.texts[i].tokens), "error", exc)
                continue
            finish = "stop" if (is_eos or stopped) else ("length" if at_limit else None)
            step[i] = Delta(new, len(self.texts[i].tokens), finish)
            if finish is None:
                keep.append(j)
                self.tokens[j] = pick
                if params.repetition_penalty != 1.0:
                    self.seen[i].append(pick)
        self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        """Only the active requests at these positions decode on (their rows stay in the cache)."""
        if not keep:
            self.active, self.tokens, self.done = [], [], True
            return
        if len(keep) < len(self.active):
            assert self.batch is not None
            kept = set(keep)
            with torch.inference_mode():
                self.batch.select(
                    torch.tensor([r for r, owner in enumerate(self.exp.owner) if owner in kept])
                )
            self.active = [self.active[j] for j in keep]
            self.tokens = [self.tokens[j] for j in keep]
            self.exp = self._expansion()

    def drop(self, requests: Iterable[int]) -> None:
        """These requests stop here (their client went away); the others decode on."""
        gone = set(requests)
        self._keep([j for j, i in enumerate(self.active) if i not in gone])

    def absorb(self, other: Decoding) -> bool:
        """Take in `other`'s unfinished requests, after this batch's, when both have started on
        the lean decoder with the same adapter stack: each step then decodes both in one forward
        pass, `other`'s requests at entries len(requests)-before.. of this batch's steps, and
        `other` is left finished. False (nothing changes) when that cannot be done."""
        mine, theirs = self.batch, other.batch
        if self.done or other.done or not isinstance(mine, FastBatch) or not isinstance(theirs, FastBatch):
            return False
        if mine.stack is not theirs.stack or mine.d is not theirs.d:
            return False  # an adapter was loaded in between: the slots differ
        offset = len(self.requests)
        with torch.inference_mode():
            mine.merge(theirs)
        self.requests += other.requests
        self.texts += other.texts
        self.seen += other.seen
        self.active += [offset + i for i in other.active]
        self.tokens += other.tokens
        self.exp = self._expansion()
        other.done, other.active, other.batch = True, [], None
        return True


def decode(
    pool: ExpertPool,
    requests: Sequence[GenerationRequest],
    failed: Mapping[int, Exception] | None = None,
    fast: bool = True,
) -> Iterator[list[Delta | None]]:
    """Decode a batch step by step (`Decoding`); each step yields one entry per request, `None`
    once it finished. The caller must keep pulling until the iterator ends (it owns no other
    resources)."""
    decoding = Decoding(pool, requests, failed, fast)
    while (step := decoding.step()) is not None:
        yield step


def generate(
    pool: ExpertPool,
    requests: Sequence[GenerationRequest],
    failed: Mapping[int, Exception] | None = None,
    fast: bool = True,
) -> list[tuple[str, int, str] | Exception]:
    """Decode a batch to the end (`decode`'s arguments): (text, completion tokens, finish reason)
    per request, or the exception of a request that failed."""
    return results(decode(pool, requests, failed, fast), len(requests))


def results(steps: Iterable[Sequence[Delta | None]], n: int) -> list[tuple[str, int, str] | Exception]:
    """The steps of a batch of `n` requests summed up as `generate` returns them."""
    texts = [""] * n
    result: list[tuple[str, int, str] | Exception] = [("", 0, "length")] * n
    for step in steps:
        for i, delta in enumerate(step):
            if delta is not None and delta.error is not None:
                result[i] = delta.error
            elif delta is not None:
                texts[i] += delta.text
                result[i] = (texts[i], delta.completion_tokens, delta.finish_reason or "length")
    return result

"""Batched decoding over the expert pool: one forward pass per step for every request in a batch.

Requests for different experts (and posterior-weighted mixtures of several) share each forward
pass: every request is expanded into one row per expert it mixes (`Expansion`), rows run with
their own adapter (`decoder`: the pool's stacked LoRA, or peft `adapter_names`), and the
rows of one request are mixed back into one next-token distribution. Prompts are left-padded; the
attention mask and position ids make the padding invisible, so a request decodes the same tokens
alone or in a batch (greedy, fp32). A KV cache holds the expanded rows; finished requests are
dropped from it. A request that fails (a bad input, an adapter that does not load, a distribution
that cannot be sampled) ends alone with its error; the rest of its batch decodes on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from experts.adapters import Expansion, ExpertPool
from serving.api import RequestError
from serving.engine.decoder import FastBatch, HFBatch
from serving.engine.prepare import decoder_for, lora_stack
from serving.engine.requests import Delta, GenerationRequest, adapter_version
from serving.engine.sampling import Text, eos_ids, sample

log = logging.getLogger(__name__)


def start_batch(
    pool: ExpertPool,
    ids: torch.Tensor,
    mask: torch.Tensor,
    adapters: Sequence[str],
    capacity: int,
    fast: bool = True,
) -> FastBatch | HFBatch:
    """A decode batch of left-padded rows ids/mask [rows, width], row i with adapter `adapters[i]`,
    room for `capacity` columns in all; the fast path where it can serve, else the HF model."""
    decoder = decoder_for(pool) if fast else None
    stack = lora_stack(pool)
    if decoder is not None and stack is not None and set(stack.groups) <= decoder.lora_keys:
        return FastBatch(pool, decoder, stack, ids, mask, adapters, capacity)
    return HFBatch(pool, ids, mask, adapters)


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
    (iteration-level batching: `scheduler.Scheduler` merges a batch that arrives into a running one).

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
        self.eos = eos_ids(pool)
        self.texts = [Text(pool.tokenizer, r.params.stop) for r in self.requests]
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
            picks = sample(
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

"""The completion pipeline: from a validated request body to the pool's stream of deltas.

route (or the model the client named) -> servable decision -> grounding -> chat template and
limits -> placement -> generation request -> the pool; and, once the answer is done or failed,
the request's metrics and query-log row. No Ray and no FastAPI here: the pool is a plain callable
(the ingress passes one that calls the pool deployment's handle), so the whole path runs in a unit
test with a real tokenizer and a real function as the pool. Every step reads one `Catalogue`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from experts.adapters import BASE
from experts.config import GenerationSpec
from experts.errors import UnknownExpertError
from serving.api import AUTO, ChatCompletionRequest, CompletionRequest, RequestError, UnavailableError
from serving.catalogue import Catalogue, served_experts
from serving.engine import Delta, GenerationRequest, SamplingParams
from serving.trust.querylog import QueryEntry

if TYPE_CHECKING:
    from router.model import RoutingDecision
    from serving.metrics import Metrics

log = logging.getLogger("serving")
Body = ChatCompletionRequest | CompletionRequest
# (pool deployment name, request) -> the request's deltas, the first one first.
Pool = Callable[[str, GenerationRequest], AsyncIterator[Delta]]


@dataclass
class Completion:
    """One request on its way through the pipeline: what its response and query-log row need.
    The pipeline fills `question`, `decision`, `sources` and `prompt` as it gets to them, so a
    request that fails part-way is logged with what was known by then."""

    rid: str
    model: str  # what the client asked for
    endpoint: str  # "chat" or "completions"
    arrived: float = field(default_factory=time.time)  # unix seconds
    started: float = field(default_factory=time.perf_counter)
    question: str = ""  # the text routed and grounded on (the last user turn, or the prompt)
    decision: RoutingDecision | None = None
    sources: list[dict[str, Any]] = field(default_factory=list)
    prompt: tuple[int, ...] = ()  # the prompt's token ids

    @classmethod
    def of(cls, body: Body, rid: str) -> Completion:
        return cls(rid, body.model, "chat" if isinstance(body, ChatCompletionRequest) else "completions")

    def entry(
        self,
        output: str = "",
        completion_tokens: int = 0,
        status: str = "ok",
        sources: list[dict[str, Any]] | None = None,
    ) -> QueryEntry:
        """The query-log row of this request (answered or failed)."""
        decision = self.decision
        return QueryEntry(
            prompt=self.question,
            request_id=self.rid,
            ts=self.arrived,
            model=self.model,
            expert=decision.expert if decision else None,
            experts=dict(decision.experts) if decision else {},
            confidence=decision.confidence if decision else None,
            decision=decision.decision if decision else None,
            output=output,
            sources=self.sources if sources is None else sources,
            latency_s=time.perf_counter() - self.started,
            prompt_tokens=len(self.prompt),
            completion_tokens=completion_tokens,
            status=status,
            endpoint=self.endpoint,
        )


def route_text(body: Body) -> str:
    """What the router reads and retrieval searches for: the last user turn, or the prompt."""
    if isinstance(body, ChatCompletionRequest):
        users = [m.text() for m in body.messages if m.role == "user"]
        return users[-1] if users else body.messages[-1].text()
    return body.text()


def unmixed(decision: RoutingDecision) -> RoutingDecision:
    """A routing decision an engine that cannot mix adapters serves as it is answered: a mixture
    becomes its top expert alone, reported as `routed` (the router's probabilities are kept, so
    the query log still shows the runner-up)."""
    if len(decision.experts) <= 1:
        return decision
    return dataclasses.replace(decision, experts={decision.expert: 1.0}, decision="routed")


def servable(decision: RoutingDecision, served: Collection[str], fallback_model: str) -> RoutingDecision:
    """The router's decision restricted to the `served` models (an expert whose adapter is not
    trained yet is not): the rest of a mixture is renormalised; with none left, the fallback."""
    kept = {k: w for k, w in decision.experts.items() if k in served}
    if len(kept) == len(decision.experts):
        return decision
    log.warning("router chose %s, not served here; answering with what is", sorted(decision.experts))
    if not kept:
        fallback = fallback_model if fallback_model in served else BASE
        return dataclasses.replace(decision, expert=fallback, experts={fallback: 1.0}, decision="fallback")
    total = sum(kept.values())
    weights = {k: w / total for k, w in kept.items()}
    return dataclasses.replace(
        decision,
        expert=max(weights, key=weights.__getitem__),
        experts=weights,
        decision="mixture" if len(weights) > 1 else "routed",
    )


def prompt_ids(
    tokenizer: Any, body: Body, gen: GenerationSpec, limit: int, grounded: str | None = None
) -> list[int]:
    """Token ids of the prompt (at most `limit`); `grounded` (question + sources) replaces the
    last user turn. Chat requests get the expert's system prompt unless they bring their own."""
    if isinstance(body, CompletionRequest):
        ids = tokenizer(grounded or body.text(), add_special_tokens=True).input_ids
        param = "prompt"
    else:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if grounded is not None:
            users = [i for i, m in enumerate(messages) if m["role"] == "user"]
            messages[users[-1] if users else -1]["content"] = grounded  # the routed text
        for m in messages:
            if m["role"] == "developer":
                m["role"] = "system"
        if not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": gen.system_prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        param = "messages"
    if len(ids) > limit:
        raise RequestError(
            f"prompt is {len(ids)} tokens; this server accepts at most {limit} (serve.max_prompt_tokens)",
            param=param,
            code="context_length_exceeded",
        )
    if not ids:
        raise RequestError("the prompt is empty", param=param)
    return list(ids)


def max_tokens(body: Body, gen: GenerationSpec, limit: int) -> int:
    """The request's token budget: what it asks for (at most `limit`), else the expert's default."""
    asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if asked is not None and asked > limit:
        raise RequestError(
            f"max_tokens {asked} exceeds this server's limit of {limit} (serve.max_tokens_limit)",
            param="max_tokens",
        )
    return asked or min(gen.max_new_tokens, limit)


def sampling(body: Body, gen: GenerationSpec, budget: int) -> SamplingParams:
    """The request's sampling settings over the expert's defaults."""
    return SamplingParams(
        max_tokens=budget,
        temperature=gen.temperature if body.temperature is None else body.temperature,
        top_p=gen.top_p if body.top_p is None else body.top_p,
        repetition_penalty=gen.repetition_penalty,
        stop=body.stops(),
        ignore_eos=body.ignore_eos,
    )


def target(catalogue: Catalogue, decision: RoutingDecision) -> tuple[str, dict[str, float]]:
    """The pool deployment that serves the decision and the mixture weights it can serve there."""
    placement = catalogue.placement
    missing = [name for name in decision.experts if name not in placement]
    if decision.expert not in placement:
        raise UnavailableError(
            f"expert {decision.expert!r} has no adapter loaded; run `moe train expert={decision.expert}`"
        )
    where = placement[decision.expert]
    experts = {k: v for k, v in decision.experts.items() if placement.get(k) == where}
    if missing or len(experts) < len(decision.experts):
        log.warning("mixture %s served as %s (other experts live elsewhere)", decision.experts, experts)
    return where, experts


def refuse_unserved(catalogue: Catalogue, model: str) -> None:
    """A configured expert whose adapter did not load: say why (503), not just 'unknown'."""
    app = catalogue.config
    if model in {e.name for e in app.experts}:
        reason = served_experts(app)[1].get(model, "its adapter is not loaded")
        raise UnavailableError(f"expert {model!r} is configured but not served: {reason}")


class CompletionPipeline:
    """Runs a request from its body to the pool's first delta, and records how it ended.

    `pool(deployment, request)` streams a request's deltas; `metrics` (None: none kept) counts
    routing decisions and finished requests; `record` takes each query-log row (None: no log).
    """

    def __init__(
        self,
        tokenizer: Any,
        pool: Pool,
        metrics: Metrics | None = None,
        record: Callable[[QueryEntry], Any] | None = None,
    ):
        self.tokenizer = tokenizer
        self.pool = pool
        self.metrics = metrics
        self.record = record

    async def decide(self, catalogue: Catalogue, model: str, text: str) -> RoutingDecision:
        """Where the request goes: the router's servable decision for `auto`, else the named model."""
        from router.model import RoutingDecision

        if model == AUTO:
            if catalogue.router is None:
                raise UnavailableError(f"model 'auto' needs the router: {catalogue.router_error}")
            # A linear classifier call: cheaper in-process than a network hop; a thread keeps
            # the event loop free for slower (embedding) pipelines.
            (decision,) = await asyncio.to_thread(catalogue.router.decide, [text])
            decision = servable(decision, catalogue.placement, catalogue.config.router.fallback_model)
            if catalogue.config.serve.pool.engine == "vllm":  # it cannot mix adapters: the top expert answers
                decision = unmixed(decision)
            if self.metrics is not None:
                self.metrics.routed(decision.confidence, decision.decision)
            return decision
        if model not in catalogue.placement:
            refuse_unserved(catalogue, model)
            raise UnknownExpertError(model, catalogue.models())
        return RoutingDecision.forced(model)

    async def ground(
        self, catalogue: Catalogue, expert: str, question: str
    ) -> tuple[str | None, list[dict[str, Any]]]:
        """The grounded prompt and its sources when the answering expert retrieves; else (None, [])."""
        from experts.retrieval import grounded_prompt

        index = catalogue.retrievers.get(expert)
        if index is None:
            return None, []
        k = catalogue.specs[expert].serving.retrieval_top_k
        passages = await asyncio.to_thread(index.search, question, k)
        return grounded_prompt(question, passages), [p.to_dict() for p in passages]

    async def prepare(
        self, catalogue: Catalogue, body: Body, state: Completion
    ) -> tuple[str, GenerationRequest]:
        """Every step before the pool: the pool deployment to ask and the request to send it."""
        body.refuse_unsupported()
        state.question = route_text(body)
        state.decision = decision = await self.decide(catalogue, body.model, state.question)
        gen = catalogue.generation(decision.expert)
        serve = catalogue.config.serve
        budget = max_tokens(body, gen, serve.max_tokens_limit)
        grounded, state.sources = await self.ground(catalogue, decision.expert, state.question)
        state.prompt = tuple(prompt_ids(self.tokenizer, body, gen, serve.max_prompt_tokens, grounded))
        where, experts = target(catalogue, decision)
        # The adapter versions let a replica that lacks one (added while serving) load it first.
        adapters = {k: catalogue.sources[k] for k in experts if k in catalogue.sources}
        params = sampling(body, gen, budget)
        return where, GenerationRequest(state.prompt, experts, params, adapters, stream=bool(body.stream))

    async def open(
        self, catalogue: Catalogue, body: Body, state: Completion
    ) -> tuple[Delta, AsyncIterator[Delta]]:
        """Prepare the request and send it to its pool: the first delta and the stream of the rest.
        Queue-full and pool errors surface here, before any byte is sent, as does a request the
        pool refused (its batch went on)."""
        where, request = await self.prepare(catalogue, body, state)
        stream = self.pool(where, request)
        first: Delta = await stream.__anext__()
        if first.error is not None:
            raise first.error
        return first, stream

    def finished(
        self, state: Completion, output: str, tokens: int, status: int = 200, outcome: str = "ok"
    ) -> None:
        """A request that reached the pool ended (answered, failed mid-decode or cut off)."""
        decision = state.decision
        assert decision is not None  # set before the pool is asked
        if self.metrics is not None:
            latency = time.perf_counter() - state.started
            self.metrics.finished(
                decision.expert, decision.decision, status, latency, len(state.prompt), tokens
            )
        if self.record is not None:
            self.record(state.entry(output, tokens, outcome))

    def failed(self, state: Completion, status: int, outcome: str, logged: bool = True) -> None:
        """A request that failed before its first delta; `logged=False` (an unauthenticated caller)
        keeps it out of the query log."""
        decision = state.decision
        if self.metrics is not None:
            expert = decision.expert if decision is not None else state.model
            self.metrics.finished(expert, decision.decision if decision else "none", status, 0.0)
        if logged and self.record is not None:
            self.record(state.entry("", 0, outcome, sources=[]))

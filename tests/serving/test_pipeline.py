"""The completion pipeline without Ray or FastAPI: a real tiny tokenizer and config, the toy router
trained for the served experts, and a plain async function as the pool."""

from __future__ import annotations

import asyncio
import dataclasses
import re

import pytest

from experts.errors import UnknownExpertError
from serving.api import ChatCompletionRequest, CompletionRequest, RequestError, UnavailableError
from serving.engine import Delta, GenerationRequest
from tests.serving.conftest import SERVED, serve_config


class EchoPool:
    """A pool that answers every request with one word per prompt token it got (at most 3), and
    keeps what it was asked: (deployment, request)."""

    def __init__(self, refuse: Exception | None = None):
        self.calls: list[tuple[str, GenerationRequest]] = []
        self.refuse = refuse

    def __call__(self, deployment: str, request: GenerationRequest):
        self.calls.append((deployment, request))
        return self._deltas(request)

    async def _deltas(self, request: GenerationRequest):
        if self.refuse is not None:
            yield Delta("", 0, "error", self.refuse)
            return
        n = min(3, request.params.max_tokens)
        for i in range(n):
            yield Delta(f" w{i}", i + 1, "stop" if i == n - 1 else None)


@pytest.fixture(scope="module")
def tokenizer(tiny_app):
    from experts.base_model import load_tokenizer

    return load_tokenizer(tiny_app.base_model, tiny_app.paths)


def catalogue_for(artifacts, *overrides: str, placement: dict[str, str] | None = None):
    from serving.catalogue import build_catalogue, load_router_or_reason

    app = serve_config(artifacts, *overrides)
    placement = placement or {"base": "pool", **{n: "pool" for n in SERVED}}
    return build_catalogue(app, placement, *load_router_or_reason(app))


def run(pipeline, catalogue, body):
    """Open `body` through `pipeline` and read its whole answer: (state, text, last delta)."""
    from serving.pipeline import Completion

    state = Completion.of(body, "r1")

    async def go():
        first, stream = await pipeline.open(catalogue, body, state)
        text, last = first.text, first
        async for delta in stream:
            text, last = text + delta.text, delta
        return text, last

    text, last = asyncio.run(go())
    return state, text, last


def chat(model: str, content: str, **fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model=model, messages=[{"role": "user", "content": content}], **fields)


def test_a_named_expert_gets_its_system_prompt_adapter_and_a_logged_answer(serve_artifacts, tokenizer):
    from serving.pipeline import CompletionPipeline

    catalogue = catalogue_for(serve_artifacts)
    pool, rows = EchoPool(), []
    pipeline = CompletionPipeline(tokenizer, pool, record=rows.append)
    state, text, last = run(pipeline, catalogue, chat("legal", "May I sublicense this?", temperature=0.0))
    (deployment, request), legal = pool.calls[0], catalogue.specs["legal"]
    messages = [
        {"role": "system", "content": legal.generation.system_prompt},
        {"role": "user", "content": "May I sublicense this?"},
    ]
    want = tokenizer(
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    ).input_ids
    assert deployment == "pool" and request.prompt_ids == tuple(want) == state.prompt
    assert request.experts == {"legal": 1.0} and set(request.adapters) == {"legal"}
    assert request.adapters["legal"] == catalogue.sources["legal"]
    assert request.params.temperature == 0.0 and request.params.top_p == legal.generation.top_p
    assert request.params.max_tokens == min(
        legal.generation.max_new_tokens, catalogue.config.serve.max_tokens_limit
    )
    assert state.decision.decision == "forced" and text == " w0 w1 w2"
    pipeline.finished(state, text, last.completion_tokens)
    (row,) = rows
    assert (row.model, row.expert, row.decision, row.status) == ("legal", "legal", "forced", "ok")
    assert (row.output, row.prompt_tokens, row.completion_tokens) == (text, len(want), 3)
    assert row.prompt == "May I sublicense this?" and row.endpoint == "chat" and row.request_id == "r1"


def test_auto_picks_of_an_unserved_expert_fall_back_to_the_base_model(serve_artifacts, tokenizer):
    from serving.pipeline import CompletionPipeline

    # Only legal is placed: the router (trained for all three) still picks biomedical for this text.
    catalogue = catalogue_for(serve_artifacts, placement={"base": "pool", "legal": "pool"})
    pool = EchoPool()
    text = "patient clinical dose tumour therapy trial cohort insulin"
    (routed,) = catalogue.router.decide([text])
    assert routed.expert == "biomedical"
    state, _, _ = run(CompletionPipeline(tokenizer, pool), catalogue, CompletionRequest(prompt=text))
    assert (state.decision.expert, state.decision.decision) == ("base", "fallback")
    assert state.decision.confidence == routed.confidence  # the router's own view is kept for the log
    (_, request) = pool.calls[0]
    assert request.experts == {"base": 1.0} and request.adapters == {}
    assert request.prompt_ids == tuple(tokenizer(text, add_special_tokens=True).input_ids)


def test_a_mixture_sends_every_expert_of_the_decision_with_its_adapter(serve_artifacts, tokenizer):
    from serving.pipeline import CompletionPipeline

    catalogue = catalogue_for(serve_artifacts, "router.policy=mixture", "router.mixture_min_prob=0.01")
    pool = EchoPool()
    words = "patient clinical dose licence copyright warranty"
    state, _, _ = run(CompletionPipeline(tokenizer, pool), catalogue, chat("auto", words))
    decision = state.decision
    assert decision.decision == "mixture" and {"biomedical", "legal"} <= set(decision.experts)
    (_, request) = pool.calls[0]
    assert request.experts == decision.experts and sum(request.experts.values()) == pytest.approx(1.0)
    assert set(request.adapters) == set(decision.experts) - {"base"}


def test_a_mixture_is_served_by_the_pool_of_its_top_expert_only():
    from router.model import RoutingDecision
    from serving.catalogue import Catalogue
    from serving.pipeline import target

    placement = {"base": "pool", "biomedical": "pool", "python_docs": "pool", "legal": "expert_legal"}
    catalogue = Catalogue(None, placement, {}, {}, None, "", {})  # type: ignore[arg-type]
    mix = {"biomedical": 0.5, "python_docs": 0.3, "legal": 0.2}
    where, experts = target(catalogue, RoutingDecision("biomedical", mix, 0.5, "mixture", mix))
    assert where == "pool" and experts == {"biomedical": 0.5, "python_docs": 0.3}
    where, experts = target(catalogue, RoutingDecision("legal", mix, 0.5, "mixture", mix))
    assert where == "expert_legal" and experts == {"legal": 0.2}
    with pytest.raises(UnavailableError, match="'politics' has no adapter loaded"):
        target(catalogue, RoutingDecision.forced("politics"))


def test_an_unserved_model_is_refused_before_the_pool_and_logged(serve_artifacts, tokenizer, tmp_path):
    from serving.pipeline import Completion, CompletionPipeline

    pool, rows = EchoPool(), []
    pipeline = CompletionPipeline(tokenizer, pool, record=rows.append)
    with pytest.raises(UnknownExpertError, match="lgal") as unknown:
        run(pipeline, catalogue_for(serve_artifacts), chat("lgal", "hello"))
    assert "legal" in str(unknown.value)  # the available models are named
    # Configured, but its adapter is not in this artifacts folder: why, not just "unknown".
    app = serve_config(tmp_path / "no_adapters")
    from serving.catalogue import build_catalogue

    empty = build_catalogue(app, {"base": "pool"}, None, "no router here")
    with pytest.raises(UnavailableError, match="'legal' is configured but not served"):
        run(pipeline, empty, chat("legal", "hello"))
    with pytest.raises(UnavailableError, match="no router here"):
        run(pipeline, empty, chat("auto", "hello"))
    assert pool.calls == []
    state = Completion.of(chat("lgal", "hello"), "r2")
    state.question = "hello"
    pipeline.failed(state, 404, "not_found_error")
    pipeline.failed(state, 401, "authentication_error", logged=False)
    (row,) = rows
    assert (row.model, row.expert, row.status, row.request_id) == ("lgal", None, "not_found_error", "r2")


@pytest.mark.parametrize(
    ("overrides", "body", "param", "message"),
    [
        (
            (),
            lambda: chat("legal", "hi", max_tokens=100_000),
            "max_tokens",
            "exceeds this server's limit of 512",
        ),
        (
            ("serve.max_prompt_tokens=16",),
            lambda: chat("legal", "a rather long question " * 8),
            "messages",
            "at most 16 (serve.max_prompt_tokens)",
        ),
        (
            ("serve.max_prompt_tokens=16",),
            lambda: CompletionRequest(model="base", prompt="licence terms " * 20),
            "prompt",
            "at most 16 (serve.max_prompt_tokens)",
        ),
        ((), lambda: CompletionRequest(model="legal", prompt=["one", "two"]), "prompt", "only one prompt"),
        ((), lambda: chat("legal", "hi", n=2), "n", "n=2 is not supported"),
    ],
)
def test_limits_are_refused_with_the_field_named(serve_artifacts, tokenizer, overrides, body, param, message):
    from serving.pipeline import CompletionPipeline

    pool = EchoPool()
    with pytest.raises(RequestError, match=re.escape(message)) as refused:
        run(CompletionPipeline(tokenizer, pool), catalogue_for(serve_artifacts, *overrides), body())
    assert refused.value.param == param and pool.calls == []


def test_a_refusal_from_the_pool_is_raised_before_any_byte(serve_artifacts, tokenizer):
    from experts.errors import ArtifactError
    from serving.pipeline import CompletionPipeline

    pool = EchoPool(refuse=ArtifactError("cannot load adapter legal"))
    with pytest.raises(ArtifactError, match="cannot load adapter"):
        run(CompletionPipeline(tokenizer, pool), catalogue_for(serve_artifacts), chat("legal", "hi"))
    assert len(pool.calls) == 1


def test_a_reload_builds_a_new_frozen_catalogue_and_leaves_the_old_one_whole(serve_artifacts):
    from experts.config import expert_files
    from serving.catalogue import reload_catalogue

    current = catalogue_for(serve_artifacts, placement={"base": "pool", "legal": "pool"})
    assert sorted(current.specs) == ["legal"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        current.router = None  # type: ignore[misc]
    fresh, report = reload_catalogue(current, set(expert_files()))
    assert fresh is not current and sorted(fresh.specs) == sorted(SERVED)
    assert report["added"] == ["biomedical", "python_docs"] and report["removed"] == []
    assert sorted(current.specs) == ["legal"] and set(current.placement) == {"base", "legal"}
    assert fresh.placement == {"base": "pool", **{n: "pool" for n in SERVED}}


def test_the_pipeline_imports_neither_ray_nor_fastapi():
    """The request path's middle layer stays plain Python: unit-testable, and usable outside Serve."""
    import subprocess
    import sys

    code = (
        "import sys, serving.pipeline, serving.catalogue, serving.openai_format; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'fastapi', 'starlette'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"

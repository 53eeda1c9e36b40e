"""The Ray Serve application: an ingress (FastAPI, OpenAI-compatible) and the expert pool(s).

HTTP -> ingress (validates, routes in-process with the router, applies the chat template) ->
expert pool deployment (base weights once + every LoRA adapter; `@serve.batch` collects
concurrent requests and decodes them together, one forward pass per step for all experts) ->
streamed deltas back through the ingress. An expert with `serving.dedicated: true` gets its own
pool deployment with its own resources. Everything about placement comes from `conf/serve/` and
the experts' files, so the same app spreads over GPUs or nodes by config alone.

`build_app(app)` is the typed builder; `start_server(app) -> url` / `stop_server()` (or the
`running_server(app)` context manager) run it programmatically; `moe serve` runs it until Ctrl-C.
"""

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlparse

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from experts.adapters import BASE, adapter_dir, check_adapter
from experts.errors import ArtifactError, ConfigError, MoeError, UnknownExpertError
from experts.schema import AppConfig, ExpertSpec, GenerationSpec, ResourceSpec
from serving.api import (
    AUTO,
    RETRY_AFTER_S,
    AuthError,
    ChatCompletionRequest,
    CompletionRequest,
    Gate,
    OverloadedError,
    RequestError,
    RouteRequest,
    UnavailableError,
    api_keys,
    error_body,
    error_of,
    error_param,
    http_error,
    key_accepted,
    now,
)
from serving.engine import (
    Delta,
    GenerationRequest,
    SamplingParams,
    adapter_version,
    loaded_versions,
    open_batch,
    paced,
)
from serving.trust.proposals import load_summary
from serving.trust.querylog import QueryEntry, QueryLog, query_log_url
from serving.trust.review import review_router

log = logging.getLogger("serving")
APP_NAME = "moe"
ROUTING_KEYS = ("expert", "experts", "confidence", "decision")


# Defined before the deployments: Ray Serve pickles a deployment class by value when it is
# decorated, so module functions its methods call must already exist then.
def served_experts(app: AppConfig) -> tuple[list[str], dict[str, str]]:
    """Experts whose adapter is complete, and why the others are left out."""
    ok, missing = [], {}
    for spec in app.experts:
        try:
            check_adapter(spec.name, adapter_dir(spec, app.paths))
            ok.append(spec.name)
        except ArtifactError as exc:
            missing[spec.name] = str(exc)
    return ok, missing


def check_retrieval(app: AppConfig, served: list[str]) -> None:
    """Refuse to start when a served expert grounds its answers but its index was never built."""
    from experts.retrieval import index_dir

    for spec in app.experts:
        folder = index_dir(app.paths, spec.name)
        if spec.name in served and spec.serving.retrieval and not (folder / "vocabulary.json").exists():
            raise ArtifactError(
                f"expert {spec.name!r} has serving.retrieval: true but no retrieval index in {folder}; "
                f"build it with `moe index expert={spec.name}` (or set serving.retrieval: false)"
            )


# --------------------------------------------------------------------------------------------
# Expert pool deployment
# --------------------------------------------------------------------------------------------
@serve.deployment
class ExpertPoolDeployment:
    """The base model once and the adapters of `names`; mixed-expert batches, streamed per step.
    engine "process": decoded by a child process (`serving.worker`); "thread": in this replica."""

    def __init__(
        self,
        app: AppConfig,
        names: list[str],
        res: ResourceSpec,
    ):
        from serving.worker import EngineProcess, load_pool

        self.engine: Any = None
        self.pool: Any = None
        if res.engine == "process":
            self.engine = EngineProcess(app, names, res)
        else:
            self.pool = load_pool(app, names, res)
            self.versions = loaded_versions(self.pool)
        self.stream_interval_s = app.serve.stream_interval_s
        # Ray Serve's batcher runs one batch at a time unless told otherwise (a request arriving
        # mid-batch would wait for all of it); the engine interleaves the steps of those it holds.
        self._decode_batch = serve.batch(
            max_batch_size=app.serve.max_batch_size,
            batch_wait_timeout_s=app.serve.batch_wait_timeout_s,
            max_concurrent_batches=app.serve.max_concurrent_batches,
        )(self._decode)
        info = self.info()
        log.info(
            "expert pool ready (%s engine): %s on %s (%s, base weights %s)",
            res.engine,
            info["experts"],
            info["device"],
            info["dtype"],
            info["base_weights"],
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream one request's deltas (call with `handle.options(stream=True)`): the first token's
        at once (a refusal surfaces before any byte), then, for `request.stream`, what the decoder
        made since the last one at most every `serve.stream_interval_s` (0: one per token), or
        else the rest in one. Each message through Ray, the ingress and the proxy costs CPU time
        the decoder shares."""
        # A plain async generator in front of the batched one: Ray Serve 2.60 treats the
        # `@serve.batch` wrapper of a generator as a sync method and refuses to stream it.
        interval = self.stream_interval_s if request.stream else math.inf
        async for message in paced(self._decode_batch(request), interval):
            yield message

    async def _decode(self, requests: list[GenerationRequest]) -> AsyncIterator[list[Any]]:
        """What `self._decode_batch` runs for each batch of requests: decode them; each step
        yields one Delta per request (StopIteration once it ended).
        A request that fails (its adapter does not load, its input is refused) gets a Delta with
        its error; the others decode on."""
        async for step in self._steps(requests):
            yield [StopIteration if d is None else d for d in step]

    async def _steps(self, requests: list[GenerationRequest]) -> AsyncIterator[list[Any]]:
        if self.engine is not None:
            async for step in self.engine.decode(requests):
                yield step
            return
        # Adapters added or retrained since this replica started load first (this request's version).
        steps = await asyncio.to_thread(open_batch, self.pool, requests, self.versions)
        while True:
            # Torch runs in a worker thread so the event loop keeps accepting requests meanwhile.
            step = await asyncio.to_thread(next, steps, None)
            if step is None:
                return
            yield step

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose engine process died."""
        if self.engine is not None and not self.engine.alive():
            raise RuntimeError(self.engine.error or "the engine process exited")

    def info(self) -> dict[str, Any]:
        from serving.worker import pool_info

        if self.engine is None:
            return pool_info(self.pool)
        return {**self.engine.info, "engine_pid": self.engine.proc.pid}

    def __del__(self) -> None:  # Ray Serve calls this when it stops the replica
        if getattr(self, "engine", None) is not None:
            self.engine.close()


# --------------------------------------------------------------------------------------------
# Ingress deployment (FastAPI)
# --------------------------------------------------------------------------------------------
# /openapi.json and /docs (Swagger UI) are served behind the API key like every route but OPEN_PATHS:
# the schema tells which routes and fields exist. The fuzz test reads the served schema.
api = FastAPI(title="moe-experts", docs_url="/docs", redoc_url=None, openapi_url="/openapi.json")
api.add_exception_handler(HTTPException, http_error)  # 404/405/413/unreadable body: OpenAI's shape


def _ingress() -> Any:
    """The Ingress of the replica this runs in; None outside a replica or while it is constructed.

    Asked of Ray Serve, not kept in a module global: Serve runs a copy of the Ingress class pickled
    by value, whose globals are a copy too, while the routes below see this module's own.
    """
    try:
        return serve.get_replica_context().servable_object
    except Exception:  # outside a replica
        return None


def _replica_keys() -> set[str] | None:
    """The API keys of the ingress replica this runs in; None until its constructor has run."""
    return getattr(_ingress(), "api_keys", None)


api.add_middleware(Gate, keys=_replica_keys)  # API keys and the body cap, before anything else


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        message = f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}"
        param = None
    else:
        param = error_param(first.get("loc", ()))
        message = f"invalid request: {param or 'body'}: {first.get('msg', 'invalid value')}"
    return JSONResponse(
        error_body(message, "invalid_request_error", param, first.get("type")), status_code=400
    )


@api.exception_handler(MoeError)
async def _typed_error(request: Request, exc: MoeError) -> JSONResponse:
    """Typed errors raised outside a request's own try block (e.g. by a route dependency)."""
    status, body = error_of(exc)
    return JSONResponse(body, status_code=status)


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _error_type(response: JSONResponse) -> str:
    """The OpenAI error type of an error response (the query log's status of a failed request)."""
    return str(json.loads(bytes(response.body))["error"]["type"])


_RID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def _request_id(request: Request) -> str:
    """Ray Serve's request id (its proxy sets X-Request-Id and echoes it in the response), so one id
    names a request in the response, Ray's logs and the query log; a malformed one gets our own."""
    rid = request.headers.get("x-request-id", "")
    return rid if _RID.fullmatch(rid) else uuid.uuid4().hex


# One Ingress per replica process: the review routes, mounted on the module-level FastAPI app,
# reach that replica's query log, keys and router labels through this.
_REPLICA: dict[str, Any] = {}


def _require_key(request: Request) -> None:
    ingress = _ingress()
    if ingress is None:
        raise UnavailableError("the ingress is starting")
    ingress._auth(request)


def _replica_log() -> QueryLog:
    ingress = _ingress()
    if ingress is None or ingress.log is None:
        raise UnavailableError("the query log is off (serve.log_queries: false)")
    return ingress.log


def _review_labels() -> list[str] | None:
    ingress = _ingress()
    return list(ingress.router.labels) if ingress is not None and ingress.router is not None else None


def _review_clusters() -> dict[str, Any] | None:
    ingress = _ingress()
    return load_summary(ingress.config) if ingress is not None else None


# The page itself is static HTML with no data in it; its JSON API checks the API key.
api.include_router(
    review_router(
        _replica_log, _review_labels, dependencies=[Depends(_require_key)], clusters=_review_clusters
    )
)


@serve.deployment
@serve.ingress(api)
class Ingress:
    """Validates, routes in-process, tokenises, and hands requests to the expert pool(s)."""

    def __init__(
        self,
        app: AppConfig,
        pools: dict[str, DeploymentHandle],
        placement: dict[str, str],
        api_keys: list[str],
        log_url: str | None = None,
    ):
        import torch

        from experts.base_model import load_tokenizer
        from serving.metrics import Metrics

        torch.set_num_threads(app.serve.ingress.torch_threads)
        self.config = app
        self.pools = pools
        self.placement = placement  # served model name ("base" or a slug) -> pool deployment
        self.api_keys = set(api_keys)
        self.specs: dict[str, ExpertSpec] = {e.name: e for e in app.experts if e.name in placement}
        self.sources = self._sources(app, self.specs)
        from experts.config import expert_files

        self.files_at_start = set(expert_files())  # files the config chose from when it was composed
        self.tokenizer = load_tokenizer(app.base_model, app.paths)
        self.metrics = Metrics()
        self.router: Any = None
        self.router_error = ""
        self.router, self.router_error = self._load_router(app)
        # Retrieval indexes of the experts that ground their answers (build_app checked they exist).
        self.retrievers = self._retrievers(app, self.specs, {})
        # Every request goes to the query log; `record` never blocks or raises, `close` drains it.
        self.log = QueryLog(log_url) if log_url else None
        _REPLICA["ingress"] = self

    def __del__(self) -> None:  # Ray Serve calls this when it stops the replica
        if getattr(self, "log", None) is not None:
            self.log.close()

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _sources(app: AppConfig, specs: dict[str, ExpertSpec]) -> dict[str, tuple[str, float]]:
        folders = {name: adapter_dir(spec, app.paths) for name, spec in specs.items()}
        return {name: (str(folder), adapter_version(folder)) for name, folder in folders.items()}

    @staticmethod
    def _load_router(app: AppConfig) -> tuple[Any, str]:
        """The router, or None and why. A router trained for another set of experts (an expert file
        added or removed since) still routes among the experts it knows, with a warning: better than
        `auto` being down until `moe train-router` has run."""
        from router.model import load_router

        try:
            return load_router(app), ""
        except MoeError as exc:
            try:
                router = load_router(app, strict=False)
            except MoeError:  # the endpoint still serves named experts; `auto` answers 503
                log.error("router unavailable: %s", exc)
                return None, str(exc)
            log.warning("%s; routing among %s until `moe train-router` has run", exc, router.labels)
            return router, ""

    @staticmethod
    def _retrievers(app: AppConfig, specs: dict[str, ExpertSpec], have: dict[str, Any]) -> dict[str, Any]:
        """The retrieval index of every served expert with `serving.retrieval: true` (reuses `have`)."""
        from experts.retrieval import load_index

        return {
            name: have.get(name) or load_index(app, name)
            for name, spec in specs.items()
            if spec.serving.retrieval
        }

    async def _ground(self, decision: Any, question: str) -> tuple[str | None, list[dict[str, Any]]]:
        """The grounded prompt and its sources when the answering expert retrieves; else (None, [])."""
        from experts.retrieval import grounded_prompt

        index = self.retrievers.get(decision.expert)
        if index is None:
            return None, []
        k = self.specs[decision.expert].serving.retrieval_top_k
        passages = await asyncio.to_thread(index.search, question, k)
        return grounded_prompt(question, passages), [p.to_dict() for p in passages]

    def _record(self, entry: QueryEntry) -> None:
        if self.log is not None:
            self.log.record(entry)

    def _models(self) -> list[str]:
        return [AUTO, BASE, *sorted(self.specs)]

    def _auth(self, request: Request) -> None:
        if not self.api_keys:
            return
        if not key_accepted(request.headers.get("authorization", ""), self.api_keys):
            raise AuthError("missing or invalid API key (Authorization: Bearer <key>)")

    async def _decide(self, model: str, text: str) -> Any:
        from router.model import RoutingDecision

        if model == AUTO:
            if self.router is None:
                raise UnavailableError(f"model 'auto' needs the router: {self.router_error}")
            # A linear classifier call: cheaper in-process than a network hop; a thread keeps
            # the event loop free for slower (embedding) pipelines.
            (decision,) = await asyncio.to_thread(self.router.decide, [text])
            decision = self._servable(decision)
            self.metrics.routed(decision.confidence, decision.decision)
            return decision
        if model not in self.placement:
            self._refuse_unserved(model)
            raise UnknownExpertError(model, self._models())
        return RoutingDecision.forced(model)

    def _servable(self, decision: Any) -> Any:
        """The router's decision restricted to experts this endpoint serves (an expert whose adapter
        is not trained yet): the rest of a mixture is renormalised; with none left, the fallback."""
        served = {k: w for k, w in decision.experts.items() if k in self.placement}
        if len(served) == len(decision.experts):
            return decision
        log.warning("router chose %s, not served here; answering with what is", sorted(decision.experts))
        if not served:
            fallback = self.config.router.fallback_model
            fallback = fallback if fallback in self.placement else BASE
            return dataclasses.replace(
                decision, expert=fallback, experts={fallback: 1.0}, decision="fallback"
            )
        total = sum(served.values())
        weights = {k: w / total for k, w in served.items()}
        return dataclasses.replace(
            decision,
            expert=max(weights, key=weights.__getitem__),
            experts=weights,
            decision="mixture" if len(weights) > 1 else "routed",
        )

    def _generation(self, name: str) -> GenerationSpec:
        spec = self.specs.get(name)
        return spec.generation if spec else GenerationSpec()

    def _prompt_ids(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        gen: GenerationSpec,
        grounded: str | None = None,
    ) -> list[int]:
        """Token ids of the prompt; `grounded` (question + sources) replaces the last user turn."""
        if isinstance(body, CompletionRequest):
            ids = self.tokenizer(grounded or body.text(), add_special_tokens=True).input_ids
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
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
            param = "messages"
        limit = self.config.serve.max_prompt_tokens
        if len(ids) > limit:
            raise RequestError(
                f"prompt is {len(ids)} tokens; this server accepts at most {limit} (serve.max_prompt_tokens)",
                param=param,
                code="context_length_exceeded",
            )
        if not ids:
            raise RequestError("the prompt is empty", param=param)
        return ids

    def _max_tokens(self, body: ChatCompletionRequest | CompletionRequest, gen: GenerationSpec) -> int:
        limit = self.config.serve.max_tokens_limit
        asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if asked is not None and asked > limit:
            raise RequestError(
                f"max_tokens {asked} exceeds this server's limit of {limit} (serve.max_tokens_limit)",
                param="max_tokens",
            )
        return asked or min(gen.max_new_tokens, limit)

    def _target(self, decision: Any) -> tuple[DeploymentHandle, dict[str, float]]:
        """The pool that serves the decision and the mixture weights it can serve there."""
        missing = [name for name in decision.experts if name not in self.placement]
        if decision.expert not in self.placement:
            raise UnavailableError(
                f"expert {decision.expert!r} has no adapter loaded; run `moe train expert={decision.expert}`"
            )
        where = self.placement[decision.expert]
        experts = {k: v for k, v in decision.experts.items() if self.placement.get(k) == where}
        if missing or len(experts) < len(decision.experts):
            log.warning("mixture %s served as %s (other experts live elsewhere)", decision.experts, experts)
        return self.pools[where], experts

    def _refuse_unserved(self, model: str) -> None:
        """A configured expert whose adapter did not load: say why (503), not just 'unknown'."""
        if model in {e.name for e in self.config.experts}:
            reason = served_experts(self.config)[1].get(model, "its adapter is not loaded")
            raise UnavailableError(f"expert {model!r} is configured but not served: {reason}")

    def _error(self, exc: BaseException, rid: str) -> JSONResponse:
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

        gone = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)
        if isinstance(exc, BackPressureError):
            exc = OverloadedError(f"the server is at capacity; retry in {RETRY_AFTER_S} s")
        elif isinstance(exc, gone):  # a pool replica died mid-request; Ray Serve replaces it
            log.warning("request %s: expert pool replica unavailable: %s", rid, exc)
            exc = UnavailableError(f"the expert pool is restarting; retry in {RETRY_AFTER_S} s")
        status, body = error_of(exc)
        headers: dict[str, str] = {}  # Ray Serve's proxy adds X-Request-Id (the same id: see `_request_id`)
        if status == 503:
            headers["Retry-After"] = str(RETRY_AFTER_S)
        if status == 500:
            log.exception("request %s failed", rid, exc_info=exc)
            body["error"]["message"] = f"internal error (request id {rid}); the server log has the details"
        return JSONResponse(body, status_code=status, headers=headers)

    # -- the generation path ---------------------------------------------------------------
    async def _complete(self, body: ChatCompletionRequest | CompletionRequest, request: Request) -> Any:
        rid = _request_id(request)
        arrived, started = time.time(), time.perf_counter()
        chat = isinstance(body, ChatCompletionRequest)
        decision: Any = None
        sources: list[dict[str, Any]] = []
        prompt: list[int] = []
        route_text = ""
        try:
            self._auth(request)
            body.refuse_unsupported()
            if chat:
                users = [m.text() for m in body.messages if m.role == "user"]
                route_text = users[-1] if users else body.messages[-1].text()
            else:
                route_text = body.text()
            decision = await self._decide(body.model, route_text)
            gen = self._generation(decision.expert)
            max_tokens = self._max_tokens(body, gen)
            grounded, sources = await self._ground(decision, route_text)
            prompt = self._prompt_ids(body, gen, grounded)
            handle, experts = self._target(decision)
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=gen.temperature if body.temperature is None else body.temperature,
                top_p=gen.top_p if body.top_p is None else body.top_p,
                repetition_penalty=gen.repetition_penalty,
                stop=body.stops(),
                ignore_eos=body.ignore_eos,
            )
            # The adapter versions let a replica that lacks one (added while serving) load it first.
            adapters = {k: self.sources[k] for k in experts if k in self.sources}
            request_ = GenerationRequest(tuple(prompt), experts, params, adapters, stream=bool(body.stream))
            stream = handle.options(stream=True).generate.remote(request_)
            # Queue-full and pool errors surface here, before any byte: a typed HTTP error.
            first: Delta = await stream.__anext__()
            if first.error is not None:  # the pool refused this request (its batch went on)
                raise first.error
        except Exception as exc:  # the top of a request: every failure becomes one typed HTTP error
            response = self._error(exc, rid)
            expert = decision.expert if decision is not None else body.model
            self.metrics.finished(expert, getattr(decision, "decision", "none"), response.status_code, 0.0)
            if not isinstance(exc, AuthError):  # an unauthenticated caller writes nothing
                outcome = _error_type(response)
                self._record(
                    self._entry(rid, arrived, started, body, route_text, decision, "", [], prompt, 0, outcome)
                )
            return response
        routing = {k: getattr(decision, k) for k in ROUTING_KEYS}
        headers = {"X-MoE-Expert": decision.expert}
        meta = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}",
            "created": now(),
            "model": decision.expert,
        }

        def done(text: str, tokens: int, status: int = 200, outcome: str = "ok") -> None:
            self.metrics.finished(
                decision.expert, decision.decision, status, time.perf_counter() - started, len(prompt), tokens
            )
            self._record(
                self._entry(
                    rid, arrived, started, body, route_text, decision, text, sources, prompt, tokens, outcome
                )
            )

        if body.stream:
            return StreamingResponse(
                self._events(
                    stream, first, meta, routing, sources, chat, len(prompt), done, body.include_usage()
                ),
                media_type="text/event-stream",
                headers=headers,
            )
        text, last = first.text, first
        try:
            async for delta in stream:
                if delta.error is not None:  # failed mid-decode (e.g. a distribution it cannot sample)
                    raise delta.error
                text += delta.text
                last = delta
        except Exception as exc:
            response = self._error(exc, rid)
            done(text, last.completion_tokens, response.status_code, _error_type(response))
            return response
        done(text, last.completion_tokens)
        usage = {
            "prompt_tokens": len(prompt),
            "completion_tokens": last.completion_tokens,
            "total_tokens": len(prompt) + last.completion_tokens,
        }
        finish = last.finish_reason or "length"
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            payload = {**meta, "object": "chat.completion", "choices": [choice]}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            payload = {**meta, "object": "text_completion", "choices": [choice]}
        extra = {"sources": sources} if sources else {}
        return JSONResponse({**payload, "usage": usage, "routing": routing, **extra}, headers=headers)

    @staticmethod
    def _entry(
        rid: str,
        arrived: float,
        started: float,
        body: ChatCompletionRequest | CompletionRequest,
        question: str,
        decision: Any,
        output: str,
        sources: list[dict[str, Any]],
        prompt: list[int],
        completion_tokens: int,
        status: str,
    ) -> QueryEntry:
        """The query-log row of one request (answered or failed)."""
        return QueryEntry(
            prompt=question,
            request_id=rid,
            ts=arrived,
            model=body.model,
            expert=getattr(decision, "expert", None),
            experts=dict(getattr(decision, "experts", {}) or {}),
            confidence=getattr(decision, "confidence", None),
            decision=getattr(decision, "decision", None),
            output=output,
            sources=sources,
            latency_s=time.perf_counter() - started,
            prompt_tokens=len(prompt),
            completion_tokens=completion_tokens,
            status=status,
            endpoint="chat" if isinstance(body, ChatCompletionRequest) else "completions",
        )

    async def _events(
        self,
        stream: Any,
        first: Delta,
        meta: dict[str, Any],
        routing: dict[str, Any],
        sources: list[dict[str, Any]],
        chat: bool,
        prompt_tokens: int,
        done: Any,
        include_usage: bool = False,
    ) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format; the first chunk carries `routing` (and `sources`).
        `usage` rides on the chunk with `finish_reason`, or, with `stream_options.include_usage`, on one
        last chunk with empty `choices`, as OpenAI sends it (clients read it there)."""
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, **extra: Any) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {} if text is None else {"content": text}
                if extra.pop("role", False):
                    delta["role"] = "assistant"
                choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return {**meta, "object": obj, "choices": [choice], **extra}

        last, text, finished = first, "", False
        try:
            extra = {"sources": sources} if sources else {}
            yield _sse(chunk("", None, role=True, routing=routing, **extra))
            pending: list[Delta] = [first]
            while True:
                for delta in pending:
                    if delta.error is not None:  # failed mid-decode: an error event ends the stream
                        raise delta.error
                    last = delta
                    if delta.text:
                        text += delta.text
                        yield _sse(chunk(delta.text, None))
                if last.finish_reason:
                    break
                try:
                    pending = [await stream.__anext__()]
                except StopAsyncIteration:
                    break
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": last.completion_tokens,
                "total_tokens": prompt_tokens + last.completion_tokens,
            }
            finish = last.finish_reason or "length"
            if include_usage:
                yield _sse(chunk(None, finish))
                yield _sse({**meta, "object": obj, "choices": [], "usage": usage})
            else:
                yield _sse(chunk(None, finish, usage=usage))
            yield "data: [DONE]\n\n"
            finished = True
            done(text, last.completion_tokens)
        except Exception as exc:  # headers are gone: report in-band, as OpenAI does
            finished = True
            response = self._error(exc, meta["id"].split("-", 1)[1])  # logs a 500 with the request id
            done(text, last.completion_tokens, response.status_code, _error_type(response))
            yield f"data: {bytes(response.body).decode()}\n\n"
        finally:
            if not finished:  # the client went away mid-stream: log what it was sent
                done(text, last.completion_tokens, 499, "client_closed")

    # -- routes ------------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "router": self.router is not None, "experts": sorted(self.specs)}

    @api.get("/v1/models")
    async def models(self, request: Request) -> Any:
        try:
            self._auth(request)
        except AuthError as exc:
            return self._error(exc, "-")
        created = now()
        data = [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "moe-experts",
                "description": desc,
            }
            for name, desc in [
                (AUTO, "the router picks the expert (or a mixture, or the fallback)"),
                (BASE, f"the base model {self.config.base_model.name} without adapters"),
                *[(s.name, s.description) for s in sorted(self.specs.values(), key=lambda s: s.name)],
            ]
        ]
        return {"object": "list", "data": data}

    @api.post("/v1/route")
    async def route(self, body: RouteRequest, request: Request) -> Any:
        rid = _request_id(request)
        try:
            self._auth(request)
            text = body.text
            if text is None and body.messages:
                users = [m.text() for m in body.messages if m.role == "user"]
                text = users[-1] if users else body.messages[-1].text()
            if not text:
                raise RequestError("give `text` or `messages` to route", param="text")
            if self.router is None:
                raise UnavailableError(f"no router: {self.router_error}")
            (decision,) = await asyncio.to_thread(self.router.decide, [text], body.policy)
            return JSONResponse(decision.to_dict(), headers={"X-MoE-Expert": decision.expert})
        except Exception as exc:  # top of a request
            return self._error(exc, rid)

    def _reload(self) -> dict[str, Any]:
        """Re-read the expert files and the router; new adapters load on first use in each replica."""
        from experts.config import expert_files, load_expert_file
        from router.model import load_router

        files = expert_files()
        chosen = {e.name for e in self.config.experts} | (set(files) - self.files_at_start)
        app = dataclasses.replace(
            self.config, experts=tuple(load_expert_file(files[n]) for n in sorted(chosen & set(files)))
        )
        ok, missing = served_experts(app)
        router = load_router(app)  # refuses a router trained for other experts; the old one stays
        pool = self.placement[BASE]
        placement = {
            BASE: pool,
            **{n: self.placement.get(n, pool) for n in ok},
        }  # new experts: the shared pool
        specs = {e.name: e for e in app.experts if e.name in placement}
        before = set(self.specs)
        check_retrieval(app, list(specs))
        self.retrievers = self._retrievers(app, specs, self.retrievers)
        self.sources = self._sources(app, specs)
        self.config, self.specs, self.placement = app, specs, placement
        self.router, self.router_error = router, ""
        log.info("reloaded: experts %s", sorted(specs))
        return {
            "experts": sorted(specs),
            "added": sorted(set(specs) - before),
            "removed": sorted(before - set(specs)),
            "not_served": missing,
        }

    @api.post("/admin/reload")
    async def reload(self, request: Request) -> Any:
        """Pick up added, retrained or removed experts and a retrained router without downtime."""
        rid = _request_id(request)
        try:
            self._auth(request)
            return await asyncio.to_thread(self._reload)
        except Exception as exc:  # top of a request
            return self._error(exc, rid)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Any:
        return await self._complete(body, request)

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        return await self._complete(body, request)


# --------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------
def deployment_options(res: ResourceSpec, name: str) -> dict[str, Any]:
    """Ray Serve options of one deployment from its ResourceSpec."""
    options: dict[str, Any] = {
        "name": name,
        "ray_actor_options": {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus},
        "max_ongoing_requests": res.max_ongoing_requests,
        "max_queued_requests": res.max_queued_requests,
    }
    if res.autoscaling:
        options["autoscaling_config"] = dict(res.autoscaling)
    else:
        options["num_replicas"] = res.num_replicas
    return options


def thread_advice(threads: int, cpus: int, engine: str = "process") -> str | None:
    """Why `threads` torch threads per replica will decode slowly on `cpus` CPUs (None: they won't).

    libgomp counts the threads it manages, the process's initial thread included; more than the
    CPUs and it throttles its spinning, so every parallel matmul pays a futex wake-up. The
    "process" engine runs torch on its own process's initial thread (threads managed = threads);
    the "thread" engine runs it off the replica's (threads + 1): on 2 CPUs two threads there decode
    19 tok/s, one 25 (benchmarks/openmp_threads_bench.py)."""
    initial = 0 if engine == "process" else 1  # the replica's initial thread, counted too
    if threads > 1 and threads + initial > cpus:
        return (
            f"torch_threads={threads} on {cpus} CPUs ({engine} engine): OpenMP would manage "
            f"{threads + initial} threads and throttle them, slower than fewer; "
            f"use torch_threads <= {max(1, cpus - initial)}"
        )
    return None


def build_app(app: AppConfig) -> serve.Application:
    """The typed builder: ingress + one pool per base model + one deployment per dedicated expert.

    Refuses duplicate expert slugs and deployment names. Experts without a complete adapter are
    left out with a warning (requests naming them get 404; the router's picks of them get 503).
    """
    names = app.expert_names()
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"expert(s) {dupes} are configured twice; each slug may appear once")
    ok, missing = served_experts(app)
    for name, reason in missing.items():
        log.warning("not serving %s: %s", name, reason)
    if app.serve.ray_address is None:  # a local instance: this machine's CPUs are the replicas'
        cpus = len(os.sched_getaffinity(0))
        placed = [("serve.pool", app.serve.pool)] + [
            (f"expert {e.name}", e.serving.resources) for e in app.experts if e.serving.dedicated
        ]
        for label, res in placed:
            if advice := thread_advice(res.torch_threads, cpus, res.engine):
                log.warning("%s: %s", label, advice)
    specs = {e.name: e for e in app.experts}
    serve_cfg = app.serve
    pool_name = f"pool_{app.base_model.name}"
    shared = [n for n in ok if not specs[n].serving.dedicated]
    deployments = {
        pool_name: ExpertPoolDeployment.options(**deployment_options(serve_cfg.pool, pool_name)).bind(
            app, shared, serve_cfg.pool
        )
    }
    placement = {BASE: pool_name, **{n: pool_name for n in shared}}
    for name in (n for n in ok if specs[n].serving.dedicated):
        res = specs[name].serving.resources
        dep = f"expert_{name}"
        if dep in deployments or dep == "ingress":
            raise ConfigError(f"deployment name {dep!r} is used twice; rename expert {name!r}")
        deployments[dep] = ExpertPoolDeployment.options(**deployment_options(res, dep)).bind(app, [name], res)
        placement[name] = dep
    check_retrieval(app, ok)
    log_url = query_log_url(app) if serve_cfg.log_queries else None  # resolved here: replicas' cwd differs
    return Ingress.options(**deployment_options(serve_cfg.ingress, "ingress")).bind(
        app, deployments, placement, api_keys(app.serve), log_url
    )


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------
_RUNNING: dict[str, Any] = {}  # what start_server started, so stop_server stops only that


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """ray.init to a dead address hangs for minutes: fail in seconds instead."""
    if address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 10001
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ConfigError(f"serve.ray_address {address!r}: nothing answers at {host}:{port} ({exc})") from exc


def _wait_healthy(url: str, timeout_s: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise MoeError(f"the endpoint at {url} did not become healthy within {timeout_s:.0f} s")
        time.sleep(0.25)


def start_server(app: AppConfig, *, name: str = APP_NAME) -> str:
    """Start (or join) Ray, deploy the app on serve.host:serve.port; return the base URL (…/v1).

    Starts a local Ray instance unless serve.ray_address names a cluster or Ray is already
    initialised in this process. Returns once /health answers.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if _RUNNING:
        raise MoeError(f"a server is already running at {_RUNNING['url']}; stop_server() first")
    application = build_app(app)  # config errors before anything starts
    cfg = app.serve
    started_ray = False
    if not ray.is_initialized():
        if cfg.ray_address:
            _check_reachable(cfg.ray_address)
            ray.init(address=cfg.ray_address, logging_level=logging.WARNING)
        else:
            ray.init(
                address="local",
                include_dashboard=False,
                object_store_memory=cfg.object_store_mb * 2**20,
                logging_level=logging.WARNING,
            )
        started_ray = True
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(application, name=name, route_prefix="/", blocking=False)
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
        url = f"http://{host}:{cfg.port}"
        _wait_healthy(url)
    except BaseException:
        _shutdown(name, started_ray, joined=bool(cfg.ray_address))
        raise
    _RUNNING.update(url=f"{url}/v1", name=name, started_ray=started_ray, joined=bool(cfg.ray_address))
    if threading.current_thread() is threading.main_thread():
        # Ray replaces Python's SIGINT handler; put it back so Ctrl-C raises KeyboardInterrupt
        # in the caller (`moe serve`, `moe demo`), which then stops what it started.
        import signal

        signal.signal(signal.SIGINT, signal.default_int_handler)
    return f"{url}/v1"


def _shutdown(name: str, started_ray: bool, joined: bool) -> None:
    import ray

    with contextlib.suppress(Exception):
        if joined:
            serve.delete(name)  # on a shared cluster, only our application
        else:
            serve.shutdown()
    if started_ray:
        ray.shutdown()


def stop_server() -> None:
    """Stop what start_server started: the app (and Serve and Ray when it started them)."""
    if not _RUNNING:
        return
    _shutdown(_RUNNING["name"], _RUNNING["started_ray"], _RUNNING["joined"])
    _RUNNING.clear()


@contextlib.contextmanager
def running_server(app: AppConfig, *, name: str = APP_NAME) -> Iterator[str]:
    """`with running_server(app) as url:` - the endpoint for the block, stopped afterwards."""
    url = start_server(app, name=name)
    try:
        yield url
    finally:
        stop_server()


def serve_command(app: AppConfig, ctx: Any) -> None:
    """`moe serve`: run the endpoint until Ctrl-C (or SIGTERM), then stop what it started."""
    import signal

    url = start_server(app)
    ok, missing = served_experts(app)
    print(f"serving {len(ok)} expert(s) at {url}  (models: {[AUTO, BASE, *ok]})", flush=True)
    for name in missing:
        print(f"  not serving {name!r}: {missing[name]}")
    print(
        f"try: curl -s {url}/chat/completions -H 'Content-Type: application/json' "
        '-d \'{"model": "auto", "messages": [{"role": "user", "content": "What does fork() return?"}]}\''
        "\nCtrl-C stops.",
        flush=True,
    )
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        while not stopped.is_set():
            stopped.wait(1.0)
    except KeyboardInterrupt:
        print("\nstopping", flush=True)
    finally:
        stop_server()

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

from experts.adapters import BASE
from experts.errors import ConfigError, MoeError
from experts.schema import AppConfig, ResourceSpec
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
from serving.catalogue import (
    build_catalogue,
    check_retrieval,
    load_router_or_reason,
    reload_catalogue,
    served_experts,
)
from serving.engine import Delta, GenerationRequest, loaded_versions, open_batch, paced
from serving.openai_format import completion, error_type, events, meta, routing, usage
from serving.pipeline import Completion, CompletionPipeline
from serving.proposals import load_summary
from serving.querylog import QueryLog, query_log_url
from serving.review import review_router

log = logging.getLogger("serving")
APP_NAME = "moe"


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


_RID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def _request_id(request: Request) -> str:
    """Ray Serve's request id (its proxy sets X-Request-Id and echoes it in the response), so one id
    names a request in the response, Ray's logs and the query log; a malformed one gets our own."""
    rid = request.headers.get("x-request-id", "")
    return rid if _RID.fullmatch(rid) else uuid.uuid4().hex


def error_response(exc: BaseException, rid: str) -> JSONResponse:
    """The one typed HTTP error a failed request gets (OpenAI's shape); a 500 is logged with `rid`."""
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
    router = ingress.catalogue.router if ingress is not None else None
    return list(router.labels) if router is not None else None


def _review_clusters() -> dict[str, Any] | None:
    ingress = _ingress()
    return load_summary(ingress.catalogue.config) if ingress is not None else None


# The page itself is static HTML with no data in it; its JSON API checks the API key.
api.include_router(
    review_router(
        _replica_log, _review_labels, dependencies=[Depends(_require_key)], clusters=_review_clusters
    )
)


@serve.deployment
@serve.ingress(api)
class Ingress:
    """The routes: authenticates, parses, runs the completion pipeline (`serving.pipeline`) against
    the pool handles, and formats its answer as OpenAI JSON or server-sent events."""

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
        from experts.config import expert_files
        from serving.metrics import Metrics

        torch.set_num_threads(app.serve.ingress.torch_threads)
        self.pools = pools
        self.api_keys = set(api_keys)
        self.files_at_start = set(expert_files())  # files the config chose from when it was composed
        # What is served, swapped whole by a reload: a request reads it once (see serving.catalogue).
        self.catalogue = build_catalogue(app, placement, *load_router_or_reason(app))
        # Every request goes to the query log; `record` never blocks or raises, `close` drains it.
        self.log = QueryLog(log_url) if log_url else None
        self.pipeline = CompletionPipeline(
            load_tokenizer(app.base_model, app.paths),
            self._generate,
            Metrics(),
            self.log.record if self.log is not None else None,
        )

    def __del__(self) -> None:  # Ray Serve calls this when it stops the replica
        if getattr(self, "log", None) is not None:
            self.log.close()

    def _generate(self, deployment: str, request: GenerationRequest) -> AsyncIterator[Delta]:
        """The pipeline's pool: stream `request`'s deltas from the pool deployment's handle."""
        # stream=True: a DeploymentResponseGenerator, which iterates as an AsyncIterator[Delta]
        return self.pools[deployment].options(stream=True).generate.remote(request)  # type: ignore[return-value]

    def _auth(self, request: Request) -> None:
        if not self.api_keys:
            return
        if not key_accepted(request.headers.get("authorization", ""), self.api_keys):
            raise AuthError("missing or invalid API key (Authorization: Bearer <key>)")

    # -- the generation path ---------------------------------------------------------------
    async def _complete(self, body: ChatCompletionRequest | CompletionRequest, request: Request) -> Any:
        state = Completion.of(body, _request_id(request))
        catalogue = self.catalogue  # read once: a reload meanwhile does not change this request's
        chat = isinstance(body, ChatCompletionRequest)
        try:
            self._auth(request)
            first, stream = await self.pipeline.open(catalogue, body, state)
        except Exception as exc:  # the top of a request: every failure becomes one typed HTTP error
            response = error_response(exc, state.rid)
            # An unauthenticated caller writes nothing to the query log.
            self.pipeline.failed(
                state, response.status_code, error_type(response), logged=not isinstance(exc, AuthError)
            )
            return response
        decision = state.decision
        assert decision is not None  # the pipeline decided before it asked the pool
        routed = routing(decision)
        headers = {"X-MoE-Expert": decision.expert}
        head = meta(state.rid, chat, decision.expert, now())
        prompt_tokens = len(state.prompt)

        def done(text: str, tokens: int, status: int = 200, outcome: str = "ok") -> None:
            self.pipeline.finished(state, text, tokens, status, outcome)

        if body.stream:
            return StreamingResponse(
                events(
                    stream,
                    first,
                    head,
                    routed,
                    state.sources,
                    chat,
                    prompt_tokens,
                    done,
                    error_response,
                    body.include_usage(),
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
            response = error_response(exc, state.rid)
            done(text, last.completion_tokens, response.status_code, error_type(response))
            return response
        done(text, last.completion_tokens)
        used = usage(prompt_tokens, last.completion_tokens)
        finish = last.finish_reason or "length"
        payload = completion(head, chat, text, finish, used, routed, state.sources)
        return JSONResponse(payload, headers=headers)

    # -- routes ------------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        catalogue = self.catalogue
        return {"status": "ok", "router": catalogue.router is not None, "experts": sorted(catalogue.specs)}

    @api.get("/v1/models")
    async def models(self, request: Request) -> Any:
        try:
            self._auth(request)
        except AuthError as exc:
            return error_response(exc, "-")
        catalogue = self.catalogue
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
                (BASE, f"the base model {catalogue.config.base_model.name} without adapters"),
                *[(s.name, s.description) for s in sorted(catalogue.specs.values(), key=lambda s: s.name)],
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
            router, reason = self.catalogue.router, self.catalogue.router_error
            if router is None:
                raise UnavailableError(f"no router: {reason}")
            (decision,) = await asyncio.to_thread(router.decide, [text], body.policy)
            return JSONResponse(decision.to_dict(), headers={"X-MoE-Expert": decision.expert})
        except Exception as exc:  # top of a request
            return error_response(exc, rid)

    def _reload(self) -> dict[str, Any]:
        """Re-read the expert files and the router; new adapters load on first use in each replica."""
        catalogue, report = reload_catalogue(self.catalogue, self.files_at_start)
        self.catalogue = catalogue  # one assignment: a request sees the old catalogue or the new
        log.info("reloaded: experts %s", report["experts"])
        return report

    @api.post("/admin/reload")
    async def reload(self, request: Request) -> Any:
        """Pick up added, retrained or removed experts and a retrained router without downtime."""
        rid = _request_id(request)
        try:
            self._auth(request)
            return await asyncio.to_thread(self._reload)
        except Exception as exc:  # top of a request
            return error_response(exc, rid)

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

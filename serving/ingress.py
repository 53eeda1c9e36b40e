"""The ingress deployment: thin FastAPI routes in front of the completion pipeline.

A route authenticates, lets pydantic parse the body (`serving.api`), hands a completion to the
plain pipeline (`serving.pipeline`: decision, grounding, chat template and limits, placement, the
generation request, the query-log row) with the pool handles as its pool, and formats what comes
back as OpenAI JSON or server-sent events (`serving.openai_format`); every failure becomes one
typed HTTP error (`error_response`). What is served lives in one frozen `Catalogue`
(`serving.catalogue`) that `/admin/reload` swaps in one assignment.
"""

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from experts.adapters import BASE
from experts.config import AppConfig
from experts.errors import MoeError
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
    error_body,
    error_of,
    error_param,
    http_error,
    key_accepted,
    now,
)
from serving.catalogue import build_catalogue, load_router_or_reason, reload_catalogue
from serving.engine import Delta, GenerationRequest
from serving.openai_format import completion, error_type, events, meta, routing, usage
from serving.pipeline import Completion, CompletionPipeline
from serving.trust.proposals import load_summary
from serving.trust.querylog import QueryLog
from serving.trust.review import review_router

log = logging.getLogger("serving")

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
        if (query_log := getattr(self, "log", None)) is not None:
            query_log.close()

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
            catalogue = self.catalogue
            if catalogue.router is None:
                raise UnavailableError(f"no router: {catalogue.router_error}")
            (decision,) = await asyncio.to_thread(catalogue.router.decide, [text], body.policy)
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

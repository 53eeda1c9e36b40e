"""The HTTP boundary: OpenAI-compatible request bodies (pydantic) and the error table.

Pydantic lives here only. Every error leaves the server in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`; typed errors map to status codes in one place
(`ERROR_STATUS`).
"""

from __future__ import annotations

import hmac
import json
import os
import re
import time
from collections.abc import Callable, Collection
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from experts.config import ServeSpec
from experts.errors import ArtifactError, ConfigError, MoeError, UnknownExpertError

AUTO = "auto"


class RequestError(MoeError):
    """The request asks for something the server refuses (too long, bad parameter): HTTP 400."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class OverloadedError(MoeError):
    """Every queue is full: HTTP 503 with Retry-After; the client should try again shortly."""


class AuthError(MoeError):
    """Missing or wrong API key: HTTP 401."""


class UnavailableError(MoeError):
    """A needed artifact (router, adapter) is not loaded: HTTP 503."""


# One table from typed error to (status, OpenAI error type). First match wins (subclasses first).
ERROR_STATUS: tuple[tuple[type[BaseException], int, str], ...] = (
    (RequestError, 400, "invalid_request_error"),
    (AuthError, 401, "authentication_error"),
    (UnknownExpertError, 404, "not_found_error"),
    (OverloadedError, 503, "overloaded_error"),
    (UnavailableError, 503, "service_unavailable"),
    (ArtifactError, 503, "service_unavailable"),
    (ConfigError, 400, "invalid_request_error"),
)
RETRY_AFTER_S = 1
# The largest request body read (413 beyond): a prompt is capped at serve.max_prompt_tokens anyway,
# so this only stops a client from making the server buffer megabytes it would then refuse.
MAX_BODY_BYTES = 4 * 2**20
# Paths answered without an API key: the health probe, and the review page (static HTML with no data
# in it; the page sends the key with each call to its JSON API, which the key protects).
OPEN_PATHS = frozenset({"/health", "/review"})


def error_status(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, OpenAI error type) of an exception; anything untyped is a 500."""
    for cls, status, kind in ERROR_STATUS:
        if isinstance(exc, cls):
            return status, kind
    return 500, "server_error"


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_of(exc: BaseException) -> tuple[int, dict[str, Any]]:
    status, kind = error_status(exc)
    code = getattr(exc, "code", None)
    if isinstance(exc, UnknownExpertError):
        code = "model_not_found"
    return status, error_body(str(exc), kind, getattr(exc, "param", None), code)


# Starlette's own HTTP errors (unknown path 404, wrong method 405, an unreadable body 400, the
# review API's HTTPExceptions) by status; anything else >= 500 is a server_error.
HTTP_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
}


async def http_error(request: Any, exc: Any) -> Any:
    """FastAPI handler for `HTTPException`: the same OpenAI error shape as every other error."""
    from fastapi.responses import JSONResponse

    status = int(exc.status_code)
    kind = HTTP_ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    if status == 400 and message == "There was an error parsing the body":  # e.g. invalid UTF-8
        message = "the request body is not valid UTF-8 JSON"
    headers = dict(getattr(exc, "headers", None) or {})
    return JSONResponse(error_body(message, kind, None, None), status_code=status, headers=headers)


# pydantic names union members in an error's location (`prompt.str`, `content.list[ContentPart]`,
# `function-after[...]`); the client wants the field (`prompt`, `messages.0.content`).
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|none)$|[\[(]")


def error_param(loc: Collection[Any]) -> str | None:
    """The request field a validation error's location names, OpenAI style (`messages.0.role`)."""
    parts = [str(p) for p in loc if p != "body" and not _UNION_MEMBER.search(str(p))]
    return ".".join(parts) or None


def api_keys(serve: ServeSpec) -> list[str]:
    """Accepted API keys: $<serve.api_keys_env> (comma-separated) plus serve.api_keys_file lines.
    The server checks them and `moe reload` / `add-expert` / `remove-expert` send the first one."""
    keys = [k.strip() for k in os.environ.get(serve.api_keys_env, "").split(",") if k.strip()]
    if serve.api_keys_file:
        path = os.path.expanduser(serve.api_keys_file)
        try:
            with open(path) as fh:
                keys += [line.strip() for line in fh if line.strip() and not line.startswith("#")]
        except OSError as exc:
            raise ConfigError(f"serve.api_keys_file {path!r} cannot be read: {exc}") from exc
    return keys


def key_accepted(authorization: str, keys: Collection[str]) -> bool:
    """`Authorization: Bearer <key>` names one of `keys` (compared in constant time)."""
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return False
    given_bytes = given.strip().encode()
    return any(hmac.compare_digest(given_bytes, key.encode()) for key in keys)


class Gate:
    """ASGI middleware in front of every route, before FastAPI reads the body.

    With API keys set (`keys()` non-empty), a request to any path but OPEN_PATHS without a valid
    `Authorization: Bearer <key>` gets 401, so nothing (not even validation) answers a caller without
    a key. A body over MAX_BODY_BYTES gets 413 (by its Content-Length, or while it streams in).
    `keys()` returns None while the keys are not known yet (the replica is starting): 503.
    """

    def __init__(self, app: Any, keys: Callable[[], Collection[str] | None], max_body: int = MAX_BODY_BYTES):
        self.app = app
        self.keys = keys
        self.max_body = max_body

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from fastapi import HTTPException
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        if scope["path"].rstrip("/") not in OPEN_PATHS:
            keys = self.keys()
            if keys is None:
                return await self._reply(
                    scope, receive, send, 503, "service_unavailable", "the server is starting"
                )
            if keys and not key_accepted(headers.get("authorization", ""), keys):
                message = "missing or invalid API key (Authorization: Bearer <key>)"
                return await self._reply(scope, receive, send, 401, "authentication_error", message)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return await self._reply(scope, receive, send, 413, "invalid_request_error", self._too_large())
        seen = 0

        async def counted() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:  # a chunked body: FastAPI re-raises HTTPException to our handler
                raise HTTPException(413, self._too_large())
            return message

        await self.app(scope, counted, send)

    def _too_large(self) -> str:
        return f"the request body is over {self.max_body // 2**20} MiB"

    @staticmethod
    async def _reply(scope: Any, receive: Any, send: Any, status: int, kind: str, message: str) -> None:
        from fastapi.responses import JSONResponse

        headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
        await JSONResponse(error_body(message, kind), status_code=status, headers=headers)(
            scope, receive, send
        )


def _valid_text(value: str) -> str:
    """JSON may carry lone UTF-16 surrogates (`"\\ud800"`); no tokenizer or encoder accepts them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text is not valid Unicode (lone surrogate at position {exc.start})") from None
    return value


# Every string a request brings: valid Unicode, so a bad character is a 400, not a crash downstream.
Text = Annotated[str, AfterValidator(_valid_text)]
# Sampling knobs at the edge of fp32 fail the whole decode batch (every request in it), so they are
# moved to values that mean the same. Below MIN_TEMPERATURE sampling is greedy in all but name, and
# dividing log-probabilities by it overflows to inf/nan: it becomes 0 (greedy). A top_p below
# MIN_TOP_P keeps the top token only, as MIN_TOP_P does, but under fp32's range (5e-324) it kept none.
MIN_TEMPERATURE = 1e-3
MIN_TOP_P = 1e-6


# --------------------------------------------------------------------------------------------
# Request bodies. Unknown OpenAI fields are accepted and ignored (clients send many); the ones
# that would change what comes back and are not supported (`n` > 1, `logprobs`) are refused.
# --------------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False  # one last chunk with empty `choices` and the request's `usage`


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Text = AUTO
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stream: bool = False
    stop: Text | list[Text] | None = None
    n: int = 1
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: decode exactly max_tokens (benchmarks)

    @field_validator("temperature")
    @classmethod
    def _greedy_below_min(cls, value: float | None) -> float | None:
        return 0.0 if value is not None and value < MIN_TEMPERATURE else value

    @field_validator("top_p")
    @classmethod
    def _top_token_below_min(cls, value: float | None) -> float | None:
        return MIN_TOP_P if value is not None and value < MIN_TOP_P else value

    def refuse_unsupported(self) -> None:
        """OpenAI options this server cannot honour: a clear 400 rather than a silently different answer."""
        if self.n != 1:
            raise RequestError(
                f"n={self.n} is not supported: one choice per request (send {self.n} requests)", param="n"
            )
        if self.logprobs_asked():
            raise RequestError("logprobs are not supported by this server", param="logprobs")

    def logprobs_asked(self) -> bool:
        return False

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Text = "text"
    text: Text = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if p.type == "text")


class ChatCompletionRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def logprobs_asked(self) -> bool:
        return bool(self.logprobs) or bool(self.top_logprobs)


class CompletionRequest(_Body):
    prompt: Text | list[Text]
    logprobs: int | None = None  # the completions API's number of top log-probabilities

    def logprobs_asked(self) -> bool:
        return self.logprobs is not None

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise RequestError("only one prompt per request is supported", param="prompt")
        return self.prompt[0]


class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: Text | None = None
    messages: list[ChatMessage] | None = None
    policy: Literal["top1", "mixture", "fallback"] | None = None


def now() -> int:
    return int(time.time())

"""The HTTP boundary: OpenAI-compatible request bodies (pydantic) and the error table.

Pydantic lives here only. Every error leaves the server in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`; typed errors map to status codes in one place
(`ERROR_STATUS`).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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


# --------------------------------------------------------------------------------------------
# Request bodies. Unknown OpenAI fields are accepted and ignored (clients send many).
# --------------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = AUTO
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    n: int = 1
    ignore_eos: bool = False  # vLLM's extension: decode exactly max_tokens (benchmarks)

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str = "text"
    text: str = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if p.type == "text")


class ChatCompletionRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_Body):
    prompt: str | list[str]

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise RequestError("only one prompt per request is supported", param="prompt")
        return self.prompt[0]


class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: str | None = None
    messages: list[ChatMessage] | None = None
    policy: Literal["top1", "mixture", "fallback"] | None = None


def now() -> int:
    return int(time.time())

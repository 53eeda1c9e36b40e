"""OpenAI's response shapes: the completion objects, the usage block and the server-sent events.

Plain dicts and strings (no FastAPI): the ingress wraps them in its responses.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from serving.engine import Delta

if TYPE_CHECKING:
    from router.model import RoutingDecision

# The decision's fields every answer carries as its top-level `routing` object.
ROUTING_KEYS = ("expert", "experts", "confidence", "decision")


def routing(decision: RoutingDecision) -> dict[str, Any]:
    return {k: getattr(decision, k) for k in ROUTING_KEYS}


def meta(rid: str, chat: bool, model: str, created: int) -> dict[str, Any]:
    """The fields every completion object and chunk of one request shares."""
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}", "created": created, "model": model}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(
    meta: dict[str, Any],
    chat: bool,
    text: str,
    finish: str,
    usage: dict[str, int],
    routing: dict[str, Any],
    sources: list[dict[str, Any]],
) -> dict[str, Any]:
    """A whole (non-streamed) answer: `chat.completion` or `text_completion`."""
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        payload = {**meta, "object": "chat.completion", "choices": [choice]}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        payload = {**meta, "object": "text_completion", "choices": [choice]}
    extra = {"sources": sources} if sources else {}
    return {**payload, "usage": usage, "routing": routing, **extra}


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def error_type(response: Any) -> str:
    """The OpenAI error type of an error response (the query log's status of a failed request)."""
    return str(json.loads(bytes(response.body))["error"]["type"])


async def events(
    stream: AsyncIterator[Delta],
    first: Delta,
    meta: dict[str, Any],
    routing: dict[str, Any],
    sources: list[dict[str, Any]],
    chat: bool,
    prompt_tokens: int,
    done: Callable[..., None],
    error: Callable[[BaseException, str], Any],
    include_usage: bool = False,
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format; the first chunk carries `routing` (and `sources`).
    `usage` rides on the chunk with `finish_reason`, or, with `stream_options.include_usage`, on one
    last chunk with empty `choices`, as OpenAI sends it (clients read it there).

    `done(text, completion_tokens[, status, outcome])` is called once however the stream ends;
    `error(exc, request_id)` makes the error response whose body a failure sends in-band."""
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
        yield sse(chunk("", None, role=True, routing=routing, **extra))
        pending: list[Delta] = [first]
        while True:
            for delta in pending:
                if delta.error is not None:  # failed mid-decode: an error event ends the stream
                    raise delta.error
                last = delta
                if delta.text:
                    text += delta.text
                    yield sse(chunk(delta.text, None))
            if last.finish_reason:
                break
            try:
                pending = [await stream.__anext__()]
            except StopAsyncIteration:
                break
        used = usage(prompt_tokens, last.completion_tokens)
        finish = last.finish_reason or "length"
        if include_usage:
            yield sse(chunk(None, finish))
            yield sse({**meta, "object": obj, "choices": [], "usage": used})
        else:
            yield sse(chunk(None, finish, usage=used))
        yield "data: [DONE]\n\n"
        finished = True
        done(text, last.completion_tokens)
    except Exception as exc:  # headers are gone: report in-band, as OpenAI does
        finished = True
        response = error(exc, meta["id"].split("-", 1)[1])  # logs a 500 with the request id
        done(text, last.completion_tokens, response.status_code, error_type(response))
        yield f"data: {bytes(response.body).decode()}\n\n"
    finally:
        if not finished:  # the client went away mid-stream: log what it was sent
            done(text, last.completion_tokens, 499, "client_closed")

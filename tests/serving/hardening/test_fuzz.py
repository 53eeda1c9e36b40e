"""Fuzzing the real endpoint: schemathesis generates requests (valid and invalid) from the app's own
OpenAPI schema, and a table of hand-written hostile requests. Nothing may answer 5xx, nothing may
hang, and every error has OpenAI's shape `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import collections
import json

import httpx
import pytest

from tests.serving.hardening.conftest import BROKEN, assert_openai_error

pytestmark = pytest.mark.serve

EXAMPLES = 50  # per operation and generation mode (fewer where the schema allows fewer): ~500 requests


def _check(status: int, headers: dict[str, str], content: bytes, where: str) -> None:
    assert status < 500, f"{where}: {status} {content[:300]!r}"
    if status >= 400:
        assert headers.get("content-type", "").startswith("application/json"), f"{where}: {content[:200]!r}"
        error = json.loads(content)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], f"{where}: {error}"


def _fuzz(operation, mode, call) -> None:
    """Run `call(case)` on EXAMPLES cases of one operation in one generation mode."""
    from hypothesis import HealthCheck, Phase, given, settings

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,  # the same cases every run: a failure reproduces
        phases=[Phase.explicit, Phase.generate],  # no shrinking: the first failure is reported as is
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case):
        call(case)

    run()


def test_schemathesis_finds_no_server_error_and_only_openai_errors(endpoint):
    import schemathesis
    from schemathesis import GenerationMode

    served = endpoint.get("/openapi.json")  # the schema the endpoint itself serves (behind the key)
    assert served.status_code == 200, served.text[:300]
    schema = schemathesis.openapi.from_dict(served.json())
    tried: collections.Counter[str] = collections.Counter()
    statuses: collections.Counter[int] = collections.Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/route"}
    for operation in operations:
        has_input = bool(operation.body or list(operation.iter_parameters()))
        for mode in [GenerationMode.POSITIVE, GenerationMode.NEGATIVE][: 2 if has_input else 1]:
            where = f"{operation.method.upper()} {operation.path} ({mode.value})"

            def call(case, where=where):
                response = case.call(base_url=endpoint.url, headers=endpoint.auth, timeout=60)
                tried[where] += 1
                statuses[response.status_code] += 1
                headers = {k: v[0] for k, v in response.headers.items()}
                _check(response.status_code, headers, response.content, f"{where} {case.body!r}")

            _fuzz(operation, mode, call)
    total = sum(tried.values())
    print(f"\nschemathesis: {total} cases over {len(tried)} operation/mode pairs; statuses {dict(statuses)}")
    assert total >= 100 and statuses[200] > 0 and sum(n for s, n in statuses.items() if s >= 400) > 0


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MB = 2**20


def _json(body) -> bytes:
    return json.dumps(body).encode()


def _msgs(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# (name, path, raw body, expected status, expected error param or None)
HOSTILE = [
    ("empty prompt", COMPLETIONS, _json({"model": "base", "prompt": ""}), 400, "prompt"),
    ("empty message list", CHAT, _json({"model": "base", "messages": []}), 400, "messages"),
    ("empty message", CHAT, _json({"model": "base", "messages": _msgs(""), "max_tokens": 2}), 200, None),
    ("1 MB prompt", COMPLETIONS, _json({"model": "base", "prompt": "word " * (MB // 5)}), 400, "prompt"),
    ("1 MB of messages", CHAT, _json({"model": "legal", "messages": _msgs("hi ") * 20_000}), 400, "messages"),
    ("5 MB body", COMPLETIONS, _json({"model": "base", "prompt": "x" * (5 * MB)}), 413, None),
    ("max_tokens -1", CHAT, _json({"messages": _msgs("hi"), "max_tokens": -1}), 400, "max_tokens"),
    ("max_tokens 0", CHAT, _json({"messages": _msgs("hi"), "max_tokens": 0}), 400, "max_tokens"),
    ("max_tokens 10**30", CHAT, _json({"messages": _msgs("hi"), "max_tokens": 10**30}), 400, "max_tokens"),
    (
        "max_tokens 1e400",
        CHAT,
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}',
        400,
        "max_tokens",
    ),
    ("max_tokens a string", CHAT, _json({"messages": _msgs("hi"), "max_tokens": "ten"}), 400, "max_tokens"),
    ("messages a string", CHAT, _json({"messages": "hi"}), 400, "messages"),
    ("role unknown", CHAT, _json({"messages": [{"role": "robot", "content": "hi"}]}), 400, "messages.0.role"),
    ("prompt a number", COMPLETIONS, _json({"prompt": 42}), 400, "prompt"),
    ("model a list", CHAT, _json({"model": ["legal"], "messages": _msgs("hi")}), 400, "model"),
    (
        "temperature NaN",
        CHAT,
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
        400,
        "temperature",
    ),
    ("temperature 3", CHAT, _json({"messages": _msgs("hi"), "temperature": 3}), 400, "temperature"),
    ("n 2", CHAT, _json({"model": "legal", "messages": _msgs("hi"), "n": 2}), 400, "n"),
    ("invalid UTF-8", COMPLETIONS, b'{"model": "base", "prompt": "caf\xe9 \xff\xfe"}', 400, None),
    ("lone surrogate", COMPLETIONS, b'{"model": "base", "prompt": "a\\ud800b"}', 400, "prompt"),
    (
        "lone surrogate model",
        CHAT,
        b'{"model": "\\udfff", "messages": [{"role": "user", "content": "hi"}]}',
        400,
        "model",
    ),
    ("NUL bytes", COMPLETIONS, _json({"model": "base", "prompt": "a\x00b\x00", "max_tokens": 2}), 200, None),
    ("truncated JSON", CHAT, b'{"messages": [', 400, None),
    ("JSON array", CHAT, b"[]", 400, None),
    ("JSON null", CHAT, b"null", 400, None),
    ("empty body", CHAT, b"", 400, None),
    ("nesting 100k deep", CHAT, b"[" * 100_000, 400, None),
    (
        "unknown fields ignored",
        CHAT,
        _json(
            {
                "model": "legal",
                "messages": _msgs("hi"),
                "max_tokens": 2,
                "frobnicate": {"x": [1]},
                "logit_bias": {"50256": -100},
            }
        ),
        200,
        None,
    ),
    (
        "stop empty string",
        CHAT,
        _json({"model": "legal", "messages": _msgs("hi"), "max_tokens": 2, "stop": [""]}),
        200,
        None,
    ),
    (
        "temperature 1e-300",
        CHAT,
        _json({"model": "legal", "messages": _msgs("hi"), "max_tokens": 2, "temperature": 1e-300}),
        200,
        None,
    ),
    (
        "top_p 5e-324 sampled",
        CHAT,
        _json(
            {"model": "legal", "messages": _msgs("hi"), "max_tokens": 2, "temperature": 1, "top_p": 5e-324}
        ),
        200,
        None,
    ),
    ("path traversal model", CHAT, _json({"model": "../../etc/passwd", "messages": _msgs("hi")}), 404, None),
    ("absolute path model", COMPLETIONS, _json({"model": "/etc/passwd", "prompt": "hi"}), 404, None),
    (
        "non-ASCII model",
        CHAT,
        _json({"model": "l\u00e9gal\u2713\U0001f600", "messages": _msgs("hi")}),
        404,
        None,
    ),
    ("adapter dir as model", COMPLETIONS, _json({"model": "experts/legal", "prompt": "hi"}), 404, None),
    ("route nothing", "/v1/route", _json({}), 400, "text"),
    ("route a huge text", "/v1/route", _json({"text": "word " * (MB // 5)}), 200, None),
]


@pytest.mark.parametrize("name,path,body,status,param", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_requests_get_clean_answers(endpoint, name, path, body, status, param):
    reply = endpoint.post(path, content=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert reply.status_code == status, reply.text[:300]
    if status == 200:
        assert reply.json()["choices"] if path != "/v1/route" else reply.json()["expert"]
        return
    error = assert_openai_error(reply, status)
    if param is not None:
        assert error["param"] == param, error
    if status == 404:
        assert error["code"] == "model_not_found" and "available" in error["message"]
        assert "root:" not in reply.text  # nothing was read from the path it named


@pytest.mark.parametrize(
    "method,path,status",
    [
        ("GET", "/v1/chat/completions", 405),
        ("DELETE", "/v1/models", 405),
        ("GET", "/v1/../../etc/passwd", 404),
        ("GET", "/v1/models/..%2F..%2Fetc%2Fpasswd", 404),
        ("GET", "/no/such/route", 404),
        ("GET", "/review/api/queue?limit=0", 400),
        ("GET", "/review/api/queue?limit=abc", 400),
        ("POST", "/review/api/..%2F..%2Fetc", 404),
    ],
)
def test_wrong_methods_and_paths_get_openai_errors(endpoint, method, path, status):
    reply = httpx.request(method, f"{endpoint.url}{path}", headers=endpoint.auth, json={}, timeout=30)
    assert_openai_error(reply, status)


def test_text_plain_body_is_400(endpoint):
    reply = endpoint.post(COMPLETIONS, content=b"prompt=hi", headers={"Content-Type": "text/plain"})
    assert_openai_error(reply, 400)


def test_streaming_errors_are_plain_openai_errors(endpoint):
    reply = endpoint.post(CHAT, json={"model": "lgal", "messages": _msgs("hi"), "stream": True})
    assert assert_openai_error(reply, 404)["code"] == "model_not_found"


def test_the_server_still_answers_after_the_fuzzing(endpoint):
    reply = endpoint.post(
        CHAT, json={"model": "auto", "messages": _msgs("the licensee shall"), "max_tokens": 3}
    )
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 3
    assert BROKEN not in [m["id"] for m in endpoint.get("/v1/models").json()["data"]]

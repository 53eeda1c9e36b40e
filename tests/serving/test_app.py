"""The real Ray Serve app on 127.0.0.1:8123 (tiny base, tiny real adapters, a trained router),
driven through the official `openai` client and plain HTTP. Started once for the module."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import httpx
import openai
import pytest

from tests.serving.conftest import SERVED, serve_config

pytestmark = pytest.mark.serve
PORT = 8123


@pytest.fixture(scope="module")
def url(serve_artifacts):
    from serving.app import start_server, stop_server

    app = serve_config(
        serve_artifacts,
        f"serve.port={PORT}",
        "serve.max_prompt_tokens=128",
        "serve.max_tokens_limit=1000",
        "serve.pool.num_cpus=0.5",
        "serve.pool.torch_threads=1",
        "serve.ingress.num_cpus=0.1",
        "serve.max_batch_size=32",
    )
    base = start_server(app)
    yield base
    stop_server()
    import ray

    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url, api_key="unused", timeout=60, max_retries=0)


def routing(reply) -> dict:
    return (reply.model_extra or {})["routing"]


def test_models_lists_every_expert_plus_auto_and_base(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["auto", "base", *sorted(SERVED)]


def test_chat_forced_expert(client):
    raw = client.chat.completions.with_raw_response.create(
        model="legal",
        messages=[{"role": "user", "content": "Who may sublicense this?"}],
        max_tokens=8,
        temperature=0,
    )
    reply = raw.parse()
    assert raw.headers["x-moe-expert"] == "legal"
    assert routing(reply) == {
        "expert": "legal",
        "experts": {"legal": 1.0},
        "confidence": 1.0,
        "decision": "forced",
    }
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content
    assert reply.usage.completion_tokens == 8 and reply.choices[0].finish_reason == "length"


def test_auto_routes_and_reports_the_decision(client):
    raw = client.chat.completions.with_raw_response.create(
        model="auto",
        messages=[{"role": "user", "content": "what dose of insulin did the clinical trial cohort get"}],
        max_tokens=4,
    )
    r = routing(raw.parse())
    assert set(r) == {"expert", "experts", "confidence", "decision"}
    assert r["expert"] == "biomedical" and r["decision"] == "routed" and 0 < r["confidence"] <= 1
    assert raw.headers["x-moe-expert"] == "biomedical"


def test_greedy_is_deterministic_and_matches_completions_base(client):
    kwargs = {"model": "base", "prompt": "def main():", "max_tokens": 6, "temperature": 0}
    first, second = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert first.choices[0].text == second.choices[0].text
    assert routing(first)["expert"] == "base" and first.usage.completion_tokens == 6


def test_chat_streaming(client):
    stream = client.chat.completions.create(
        model="python_docs",
        messages=[{"role": "user", "content": "What does asyncio.gather return?"}],
        max_tokens=6,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    assert (chunks[0].model_extra or {})["routing"]["expert"] == "python_docs"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "length"
    whole = client.chat.completions.create(
        model="python_docs",
        messages=[{"role": "user", "content": "What does asyncio.gather return?"}],
        max_tokens=6,
        temperature=0,
    )
    assert text == whole.choices[0].message.content


def test_the_pool_paces_a_stream_and_sends_a_non_streamed_request_in_two_messages(url):
    from ray import serve

    from serving.app import APP_NAME
    from serving.engine import GenerationRequest, SamplingParams

    handle = serve.get_deployment_handle("pool_tiny", APP_NAME).options(stream=True)

    async def deltas(stream: bool) -> list:
        request = GenerationRequest(
            tuple(range(5, 12)), {"legal": 1.0}, SamplingParams(max_tokens=9, ignore_eos=True), stream=stream
        )
        return [d async for d in handle.generate.remote(request)]

    streamed, whole = asyncio.run(deltas(True)), asyncio.run(deltas(False))
    assert len(whole) == 2  # the first token's (errors surface first), the rest
    # streamed: the first token at once, then serve.stream_interval_s apart (at most one per token)
    counts = [d.completion_tokens for d in streamed]
    assert counts[0] == 1 and counts == sorted(set(counts))  # each message adds tokens, none repeats
    assert "".join(d.text for d in whole) == "".join(d.text for d in streamed)
    assert (whole[-1].completion_tokens, whole[-1].finish_reason) == (9, "length")
    assert (streamed[-1].completion_tokens, streamed[-1].finish_reason) == (9, "length")


def test_completions_streaming(client):
    chunks = list(client.completions.create(model="legal", prompt="The licensee", max_tokens=5, stream=True))
    assert (chunks[0].model_extra or {})["routing"]["decision"] == "forced"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks)


def test_route_endpoint_and_health(url):
    root = url.removesuffix("/v1")
    assert httpx.get(f"{root}/health").json()["status"] == "ok"
    reply = httpx.post(f"{url}/route", json={"text": "copyright notice and warranty terms"})
    assert reply.status_code == 200 and reply.json()["expert"] == "legal"
    assert set(reply.json()["probabilities"]) == set(SERVED)


def test_unknown_model_is_404_listing_models(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="lgal", messages=[{"role": "user", "content": "hi"}])
    body = err.value.body
    assert body["code"] == "model_not_found" and "'lgal'" in body["message"] and "legal" in body["message"]


def test_too_long_prompt_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="base", prompt="word " * 500, max_tokens=4)
    assert "serve.max_prompt_tokens" in err.value.body["message"]
    assert err.value.body["code"] == "context_length_exceeded"


def test_max_tokens_over_the_limit_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="legal", messages=[{"role": "user", "content": "hi"}], max_tokens=1001
        )
    assert err.value.body["param"] == "max_tokens" and "limit of 1000" in err.value.body["message"]


@pytest.mark.parametrize(
    "content,param",
    [
        ('{"model": "auto", "messages": [', None),
        ('{"model": "auto"}', "messages"),
        ('{"messages": "x"}', "messages"),
    ],
)
def test_malformed_bodies_are_400_in_openai_shape(url, content, param):
    reply = httpx.post(
        f"{url}/chat/completions", content=content, headers={"Content-Type": "application/json"}
    )
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_a_request_arriving_mid_batch_does_not_wait_for_that_batch(client):
    """serve.max_concurrent_batches (4 here): Ray Serve's batcher alone runs one batch at a time,
    so a short request sent while a long one decodes would get its answer only after that batch
    ended; the engine interleaves the two batches' steps instead."""
    long = client.completions.create(
        model="legal",
        prompt="the court",
        max_tokens=1000,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(long)
    next(chunks)  # the long request is decoding
    ended: list[float] = []
    reader = threading.Thread(target=lambda: (list(chunks), ended.append(time.monotonic())))
    reader.start()
    short = client.completions.create(model="biomedical", prompt="dose", max_tokens=2, temperature=0)
    answered = time.monotonic()
    reader.join(60)
    assert short.usage.completion_tokens == 2 and ended
    assert answered < ended[0], "the short request waited for the long batch to end"


def test_32_concurrent_requests_all_answer(client):
    def ask(i: int):
        model = ["auto", "base", *SERVED][i % 5]
        return client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"question {i} about gene therapy"}],
            max_tokens=8,
        )

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(ask, range(32)))
    assert len({r.id for r in replies}) == 32  # 32 distinct requests answered, none merged or dropped
    for i, reply in enumerate(replies):
        model = ["auto", "base", *SERVED][i % 5]
        assert reply.usage.completion_tokens == 8 or reply.choices[0].finish_reason == "stop"
        assert routing(reply)["expert"] == (model if model != "auto" else "biomedical"), (i, routing(reply))


def test_reload_picks_up_a_retrained_adapter(url, client, tiny_app, serve_artifacts):
    from tests.experts.test_adapters import make_adapter

    ask = {"model": "legal", "prompt": "the licensee shall", "max_tokens": 8, "temperature": 0}
    before = client.completions.create(**ask).choices[0].text
    make_adapter(tiny_app, serve_artifacts / "experts" / "legal", seed=99)  # "retrained"
    reply = httpx.post(f"{url.removesuffix('/v1')}/admin/reload", timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["experts"] == sorted(SERVED) and reply.json()["added"] == []
    assert client.completions.create(**ask).choices[0].text != before


def test_an_adapter_that_fails_to_load_fails_only_its_requests(url, client, tiny_app, serve_artifacts):
    from tests.experts.test_adapters import make_adapter, make_unloadable_adapter

    root = url.removesuffix("/v1")
    folder = serve_artifacts / "experts" / "legal"
    make_unloadable_adapter(tiny_app, folder, seed=98)  # "retrained": passes the startup check, not the load

    def ask(model: str, stream: bool = False) -> httpx.Response:
        body = {"model": model, "prompt": "the licensee shall", "max_tokens": 6, "temperature": 0}
        return httpx.post(f"{url}/completions", json={**body, "stream": stream}, timeout=60)

    try:
        assert httpx.post(f"{root}/admin/reload", timeout=60).status_code == 200
        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # likely one batch; either way:
            broken, streamed, fine = pool.map(ask, ["legal", "legal", "biomedical"], [False, True, False])
        for reply in (broken, streamed):  # a typed error before any byte, streamed or not
            assert reply.status_code == 503 and reply.headers["retry-after"] == "1", reply.text
            error = reply.json()["error"]
            assert error["type"] == "service_unavailable", error
            assert "expert 'legal': cannot load adapter" in error["message"]
        assert fine.status_code == 200 and fine.json()["usage"]["completion_tokens"] == 6
    finally:
        make_adapter(tiny_app, folder, seed=99)  # sound again (the retrained legal of the test above)
        assert httpx.post(f"{root}/admin/reload", timeout=60).status_code == 200
    assert (
        client.completions.create(model="legal", prompt="the licensee", max_tokens=4).usage.completion_tokens
        == 4
    )


# -- OpenAI details clients use (the official client, sync and async) ---------------------------
QUESTION = [{"role": "user", "content": "Who may sublicense this?"}]


def greedy_chat(client, **kwargs) -> str:
    body = {"model": "legal", "messages": QUESTION, "max_tokens": 8, "temperature": 0, **kwargs}
    return client.chat.completions.create(**body).choices[0].message.content


def test_stream_options_include_usage_sends_a_last_usage_chunk(client):
    chunks = list(
        client.chat.completions.create(
            model="legal",
            messages=QUESTION,
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *answer, last = chunks
    assert last.choices == [] and last.usage is not None, last
    assert last.usage.completion_tokens == 5 and last.usage.total_tokens == last.usage.prompt_tokens + 5
    assert all(c.usage is None for c in answer) and answer[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in answer) == greedy_chat(client, max_tokens=5)


def test_async_client_streams_and_answers_like_the_sync_one(url, client):
    async def ask() -> tuple[str, str, int]:
        aclient = openai.AsyncOpenAI(base_url=url, api_key="unused", timeout=60, max_retries=0)
        body = {"model": "legal", "messages": QUESTION, "max_tokens": 8, "temperature": 0}
        whole, stream = await asyncio.gather(
            aclient.chat.completions.create(**body),
            aclient.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}),
        )
        parts, usage = [], 0
        async for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        await aclient.close()
        return whole.choices[0].message.content, "".join(parts), usage

    whole, streamed, usage = asyncio.run(ask())
    assert whole == streamed == greedy_chat(client) and usage == 8


def test_max_completion_tokens_caps_the_answer(client):
    reply = client.chat.completions.create(
        model="legal", messages=QUESTION, max_completion_tokens=3, temperature=0
    )
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="legal", messages=QUESTION, max_completion_tokens=1001)
    assert "limit of 1000" in err.value.body["message"]


def test_list_content_parts_and_the_developer_role_mean_what_they_say(client):
    parts = [{"type": "text", "text": "Who may "}, {"type": "text", "text": "sublicense this?"}]
    assert greedy_chat(client, messages=[{"role": "user", "content": parts}]) == greedy_chat(client)
    system = "You answer questions about software licences."
    as_system = greedy_chat(client, messages=[{"role": "system", "content": system}, *QUESTION])
    as_developer = greedy_chat(client, messages=[{"role": "developer", "content": system}, *QUESTION])
    assert as_developer == as_system
    assert as_system != greedy_chat(client)  # the instruction reached the prompt (not the default one)


def test_stop_ends_the_answer_before_the_stop_string(client):
    whole = greedy_chat(client, max_tokens=12)
    stop = whole[len(whole) // 2 :][:3]
    assert stop.strip(), whole
    reply = client.chat.completions.create(
        model="legal", messages=QUESTION, max_tokens=12, temperature=0, stop=[stop]
    )
    assert reply.choices[0].message.content == whole[: whole.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "extra,param",
    [({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"logprobs": True, "top_logprobs": 2}, "logprobs")],
)
def test_unsupported_options_are_refused_in_openai_shape(client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="legal", messages=QUESTION, max_tokens=2, **extra)
    assert err.value.body["type"] == "invalid_request_error" and err.value.body["param"] == param
    assert "not supported" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="legal", prompt="The licensee", max_tokens=2, logprobs=1)
    assert err.value.body["param"] == "logprobs"


def test_an_off_topic_auto_question_falls_back_to_the_base_model(client):
    """The router's background class: general text goes to router.fallback_model (base here)."""
    off_topic = "football weather holiday movie music travel"
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": off_topic}], max_tokens=6, temperature=0
    )
    reply = raw.parse()
    assert routing(reply)["decision"] == "fallback" and routing(reply)["expert"] == "base", routing(reply)
    assert raw.headers["x-moe-expert"] == "base"
    base = client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": off_topic}], max_tokens=6, temperature=0
    )
    assert reply.choices[0].message.content == base.choices[0].message.content


def test_reload_with_a_broken_router_keeps_the_old_one(url, client, serve_artifacts):
    root = url.removesuffix("/v1")
    weights = serve_artifacts / "router" / "router.safetensors"
    good = weights.read_bytes()
    ask = {
        "model": "auto",
        "messages": [{"role": "user", "content": "copyright warranty licensee"}],
        "max_tokens": 2,
    }
    try:
        weights.write_bytes(good[: len(good) // 3])  # a retrain that died half-way through writing
        reply = httpx.post(f"{root}/admin/reload", timeout=60)
        assert reply.status_code == 503, reply.text
        assert (
            "router" in reply.json()["error"]["message"] and "unreadable" in reply.json()["error"]["message"]
        )
        assert routing(client.chat.completions.create(**ask))["expert"] == "legal"  # the old router routes
        assert httpx.get(f"{root}/health").json()["router"] is True
    finally:
        weights.write_bytes(good)
    assert httpx.post(f"{root}/admin/reload", timeout=60).status_code == 200


def test_a_failure_mid_stream_reaches_the_client_as_an_sse_error_event(url, client):
    """The engine process dies while a stream is decoding: the headers are gone, so the error comes
    in-band, as OpenAI sends it, and the openai client raises it. Last in the module: the pool's
    replica is replaced afterwards (the test waits for that)."""
    import os
    import signal

    from ray import serve

    from serving.app import APP_NAME

    pool = serve.get_deployment_handle("pool_tiny", APP_NAME)
    pid = pool.info.remote().result()["engine_pid"]
    stream = client.completions.create(
        model="legal", prompt="the court", max_tokens=1000, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = iter(stream)
    received = [next(chunks), next(chunks)]  # routing chunk, then decoded text: the stream is under way
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(openai.APIError) as err:
        received += list(chunks)
    assert err.value.message and "engine" in err.value.message, err.value.message
    assert received[1].choices[0].text and not any(c.choices[0].finish_reason for c in received)
    while True:  # Ray Serve replaces the replica whose engine died (pytest-timeout bounds the wait)
        try:
            reply = client.completions.create(model="legal", prompt="the court", max_tokens=2)
            break
        except (openai.APIStatusError, openai.APIConnectionError):
            time.sleep(0.5)
    assert reply.usage.completion_tokens == 2 and pool.info.remote().result()["engine_pid"] != pid

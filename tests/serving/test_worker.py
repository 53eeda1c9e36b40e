"""The engine process (`serving.engine.process`): a real child process on the tiny pool decodes what the
replica's own thread would, interleaves batches, returns per-request errors intact, and fails
cleanly when it dies."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import time

import pytest

from experts.config import ResourceSpec
from experts.errors import ArtifactError, UnknownExpertError
from serving.api import RequestError
from serving.engine import Delta, GenerationRequest, SamplingParams, generate, load_pool, results
from serving.engine.process import (
    EngineError,
    EngineProcess,
    decode_delta,
    decode_error,
    decode_request,
    encode_delta,
    encode_error,
    encode_request,
)
from tests.serving.conftest import SERVED, serve_config

GREEDY = SamplingParams(max_tokens=8)
ONE_THREAD = ResourceSpec(torch_threads=1)


@pytest.fixture(scope="module")
def app(serve_artifacts):
    return serve_config(serve_artifacts)


@pytest.fixture(scope="module")
def engine(app):
    engine = EngineProcess(app, list(SERVED), ONE_THREAD)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def local_pool(app):
    return load_pool(app, list(SERVED), ONE_THREAD)  # the same config, in this process: the reference


def ids(pool, text: str) -> tuple[int, ...]:
    return tuple(pool.tokenizer(text).input_ids)


async def _collect(engine: EngineProcess, requests) -> list:
    """`generate`'s result shape from the engine process's steps."""
    return results([step async for step in engine.decode(requests)], len(requests))


def _requests(pool) -> list[GenerationRequest]:
    return [
        GenerationRequest(ids(pool, "what is the dose of insulin"), {"biomedical": 1.0}, GREEDY),
        GenerationRequest(ids(pool, "copyright"), {"legal": 0.5, "python_docs": 0.5}, GREEDY),
        GenerationRequest(ids(pool, "how does asyncio run"), {"base": 1.0}, SamplingParams(max_tokens=5)),
    ]


def test_the_engine_runs_in_its_own_process_with_the_pool(engine):
    assert engine.alive() and engine.proc.pid != os.getpid()
    assert sorted(engine.info["experts"]) == sorted(SERVED) and engine.info["device"] == "cpu"


def test_engine_process_decodes_what_the_replica_thread_would(engine, local_pool):
    requests = _requests(local_pool)
    got = asyncio.run(_collect(engine, requests))
    assert got == generate(local_pool, requests)
    assert [r[1] for r in got] == [8, 8, 5]


def test_two_batches_at_once_each_decode_as_alone(engine, local_pool):
    first, second = _requests(local_pool)[:2], _requests(local_pool)[2:]

    async def both():
        return await asyncio.gather(_collect(engine, first), _collect(engine, second))

    a, b = asyncio.run(both())
    assert a == generate(local_pool, first) and b == generate(local_pool, second)


def _engine_loop(pool, batches: dict[int, list], cancel_after: dict[int, int] | None = None) -> dict:
    """The engine loop's own steps, in this process over a real pipe: every batch opened at once,
    stepped and merged by the scheduler `serve_forever` runs; batch -> its messages (kind, payload)."""
    from multiprocessing import Pipe

    from serving.engine.process import _recv, emitter
    from serving.engine.scheduler import Scheduler

    ours, theirs = Pipe()
    scheduler = Scheduler(pool, max_rows=64, emit=emitter(theirs))
    for b, reqs in batches.items():
        scheduler.submit(b, reqs)
    counts = {"held after the first merge": None}
    steps = 0
    while scheduler.busy:
        scheduler.step()
        steps += 1
        if counts["held after the first merge"] is None:
            counts["held after the first merge"] = len(scheduler.held)
        for batch, after in (cancel_after or {}).items():
            if steps == after:
                scheduler.cancel(batch)
    messages: dict = {b: [] for b in batches}
    while ours.poll():
        kind, batch, payload = _recv(ours)
        messages[batch].append((kind, payload))
    return {**messages, **counts}


def test_the_engine_loop_merges_batches_and_each_decodes_as_alone(local_pool):
    first, second = _requests(local_pool)[:2], _requests(local_pool)[2:]
    got = _engine_loop(local_pool, {7: first, 8: second})
    assert got["held after the first merge"] == 1  # one forward pass a step for both
    for batch, reqs in ((7, first), (8, second)):
        kinds = [kind for kind, _ in got[batch]]
        assert kinds[-1] == "done" and set(kinds[:-1]) == {"step"}
        steps = [[decode_delta(d) for d in payload] for kind, payload in got[batch][:-1]]
        assert results(steps, len(reqs)) == generate(local_pool, reqs)
    # a batch cancelled after the merge gets nothing more; the other decodes on to the end
    got = _engine_loop(local_pool, {7: first, 8: second}, cancel_after={8: 2})
    assert len(got[8]) == 2 and [kind for kind, _ in got[8]] == ["step", "step"]
    steps = [[decode_delta(d) for d in payload] for kind, payload in got[7][:-1]]
    assert results(steps, len(first)) == generate(local_pool, first)


def test_a_refused_request_comes_back_as_its_own_error(engine, local_pool):
    vocab = local_pool.model.get_input_embeddings().weight.shape[0]
    good = _requests(local_pool)[0]
    bad = GenerationRequest((1, vocab + 5), {"legal": 1.0}, GREEDY)
    got = asyncio.run(_collect(engine, [bad, good]))
    assert isinstance(got[0], RequestError) and got[0].param == "prompt"
    assert "outside the vocabulary" in str(got[0])
    assert got[1] == generate(local_pool, [good])[0]


def test_a_dead_engine_fails_its_requests_and_its_health(app, local_pool):
    engine = EngineProcess(app, list(SERVED), ONE_THREAD)
    long = GenerationRequest(
        ids(local_pool, "gene"), {"biomedical": 1.0}, SamplingParams(500, ignore_eos=True)
    )

    async def killed_midway():
        steps = 0
        async for _ in engine.decode([long]):
            steps += 1
            if steps == 2:
                os.kill(engine.proc.pid, signal.SIGKILL)
        return steps

    with pytest.raises(EngineError, match="engine process exited"):
        asyncio.run(killed_midway())
    assert not engine.alive()
    with pytest.raises(EngineError):
        asyncio.run(_collect(engine, [long]))
    engine.close()


def test_the_engine_exits_when_its_replica_goes_away(app):
    engine = EngineProcess(app, list(SERVED), ONE_THREAD)
    # What the kernel does when the replica process dies: the socket ends for every holder.
    # (Closing only this fd would not: the reader thread's pending recv keeps the socket open.)
    with socket.socket(fileno=os.dup(engine.conn.fileno())) as end:
        end.shutdown(socket.SHUT_RDWR)
    deadline = time.monotonic() + 30
    while engine.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.proc.returncode == 0


def test_a_pool_that_cannot_load_fails_the_start_with_why(app, tmp_path):
    broken = dataclasses.replace(
        app, base_model=dataclasses.replace(app.base_model, path=str(tmp_path / "none"))
    )
    broken = dataclasses.replace(broken, base_model=dataclasses.replace(broken.base_model, source="local"))
    with pytest.raises(EngineError, match="could not load the expert pool"):
        EngineProcess(broken, list(SERVED), ONE_THREAD)


@pytest.mark.serve
def test_either_engine_serves_the_same_answers_over_http(serve_artifacts):
    """The endpoint with `serve.pool.engine=thread` and `=process`: the same greedy answers."""
    import httpx

    from serving.app import start_server, stop_server

    answers = {}
    for kind in ("thread", "process"):
        app = serve_config(serve_artifacts, "serve.port=8127", f"serve.pool.engine={kind}")
        url = start_server(app)
        try:
            with httpx.Client(base_url=url, timeout=60) as client:
                replies = [
                    client.post(
                        "/completions",
                        json={
                            "model": model,
                            "prompt": "the licensee may",
                            "max_tokens": 6,
                            "temperature": 0,
                        },
                    ).json()
                    for model in (*SERVED, "base")
                ]
        finally:
            stop_server()
        answers[kind] = [
            (r["model"], r["choices"][0]["text"], r["usage"]["completion_tokens"]) for r in replies
        ]
    assert answers["thread"] == answers["process"]
    assert [n for _, _, n in answers["process"]] == [6] * (len(SERVED) + 1)
    assert len({text for _, text, _ in answers["process"]}) > 1  # the experts answer differently


@pytest.mark.parametrize(
    "error",
    [
        RequestError("prompt token id 9 is outside the vocabulary", param="prompt", code="bad"),
        UnknownExpertError("lgal", ["legal", "biomedical"]),
        ArtifactError("cannot load adapter legal"),
        FloatingPointError("the model produced NaN log-probabilities"),
        EngineError("the engine process exited (code -9)"),
    ],
)
def test_errors_cross_the_socket_as_their_own_type_and_fields(error):
    back = decode_error(json.loads(json.dumps(encode_error(error))))
    assert type(back) is type(error) and str(back) == str(error)
    assert vars(back) == vars(error)  # param, code, name, available


def test_an_unknown_error_type_arrives_as_a_runtime_error_naming_it():
    class Odd(Exception):
        pass

    back = decode_error(json.loads(json.dumps(encode_error(Odd("strange")))))
    assert type(back) is RuntimeError and str(back) == "Odd: strange"


def test_requests_and_deltas_survive_the_json_round_trip():
    request = GenerationRequest(
        (1, 2, 3),
        {"legal": 0.6, "base": 0.4},
        SamplingParams(7, 0.5, 0.9, 1.1, ("\n\n",), True),
        {"legal": ("/tmp/legal", 1234.5)},
        stream=False,
    )
    assert decode_request(json.loads(json.dumps(encode_request(request)))) == request
    delta = Delta("hé", 3, "error", RequestError("no", param="prompt"))
    back = decode_delta(json.loads(json.dumps(encode_delta(delta))))
    assert (back.text, back.completion_tokens, back.finish_reason) == ("hé", 3, "error")
    assert isinstance(back.error, RequestError) and back.error.param == "prompt"
    assert decode_delta(encode_delta(None)) is None

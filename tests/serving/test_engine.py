"""The batched decode loop: a mixed-expert batch decodes what each request decodes alone."""

from __future__ import annotations

import asyncio
import math

import pytest

from serving.engine import Delta, GenerationRequest, SamplingParams, coalesce, decode, generate, paced
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


def _steps_until_done(decoding, into: list) -> None:
    while (step := decoding.step()) is not None:
        into.append(step)


def test_a_batch_absorbed_mid_decode_decodes_what_it_would_alone(pool):
    """Iteration-level batching: batch B joins batch A after A's third step and B's first; every
    request still decodes exactly what it decodes alone, and B's requests come back in order after
    A's. A request dropped after the merge leaves, and the others decode on."""
    from serving.engine import Decoding, results

    a = [
        GenerationRequest(ids(pool, "what is the dose of insulin"), {"biomedical": 1.0}, GREEDY),
        GenerationRequest(ids(pool, "copyright"), {"legal": 0.4, "python_docs": 0.6}, GREEDY),
    ]
    b = [
        GenerationRequest(ids(pool, "how does asyncio run a list of tasks"), {"base": 1.0}, GREEDY),
        GenerationRequest(ids(pool, "the licensee"), {"legal": 1.0}, SamplingParams(max_tokens=4)),
        GenerationRequest(ids(pool, "gene therapy trial"), {"biomedical": 1.0}, GREEDY),
    ]
    first, second = Decoding(pool, a), Decoding(pool, b)
    steps_a = [first.step() for _ in range(3)]
    steps_b = [second.step()]
    assert first.absorb(second) and second.step() is None
    rest: list = []
    _steps_until_done(first, rest)
    assert all(len(step) == len(a) + len(b) for step in rest)
    got = results(steps_a + [s[: len(a)] for s in rest], len(a)) + results(
        steps_b + [s[len(a) :] for s in rest], len(b)
    )
    assert got == generate(pool, a) + generate(pool, b)
    assert [r[1] for r in got] == [10, 10, 10, 4, 10]

    first, second = Decoding(pool, a), Decoding(pool, b)
    first.step(), second.step()
    assert first.absorb(second)
    first.drop([len(a) + 2])  # b's third request: its client went away
    rest = []
    _steps_until_done(first, rest)
    assert all(step[len(a) + 2] is None for step in rest)
    assert [r[1] for r in results([s[: len(a)] for s in rest], len(a))] == [10, 10]  # the others go on


def test_coalesced_deltas_are_the_whole_rest_of_a_request():
    deltas = [Delta("Hel", 2), Delta("", 3), Delta("lo", 4, "length")]
    assert coalesce(deltas) == Delta("Hello", 4, "length")
    error = FloatingPointError("NaN")
    assert coalesce([Delta(" a", 5), Delta("", 5, "error", error)]) == Delta(" a", 5, "error", error)


def _paced(deltas: list[Delta], times: list[float], interval_s: float) -> list[Delta]:
    """`paced` over deltas that arrive at `times` (a clock read once per delta)."""

    async def source():
        for delta in deltas:
            yield delta

    clock = iter(times)
    return asyncio.run(_collect(paced(source(), interval_s, clock=lambda: next(clock))))


async def _collect(messages):
    return [m async for m in messages]


TOKENS = [Delta(t, n) for n, t in enumerate(["The", " court", " held", " that", " the", " deed"], 1)]
ARRIVALS = [0.0, 0.1, 0.2, 0.3, 0.45, 0.6]


def test_a_stream_is_paced_into_messages_at_most_every_interval():
    messages = _paced(TOKENS, ARRIVALS, 0.25)
    # the first at once; then each message once 0.25 s passed since the last (0.3, 0.6)
    assert messages == [Delta("The", 1), Delta(" court held that", 4), Delta(" the deed", 6)]
    assert _paced(TOKENS, ARRIVALS, 0.0) == TOKENS  # 0: one message per delta
    assert _paced(TOKENS, ARRIVALS, math.inf) == [Delta("The", 1), Delta(" court held that the deed", 6)]
    assert _paced(TOKENS[:4], ARRIVALS[:4], 0.25)[-1] == Delta(" court held that", 4)  # the end flushes


def test_an_error_is_sent_at_once_however_long_the_interval():
    error = FloatingPointError("NaN")
    deltas = [Delta("The", 1), Delta(" court", 2), Delta("", 2, "error", error), Delta(" never", 3)]
    messages = _paced(deltas, [0.0, 0.1, 0.2, 0.3], math.inf)
    assert messages == [Delta("The", 1), Delta(" court", 2, "error", error), Delta(" never", 3)]


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


@pytest.mark.parametrize("stop", ["ee sh", "ee shall not", "e"])
def test_a_stop_string_over_several_tokens_is_never_streamed_in_part(pool, stop):
    """Text that may begin a stop string is held back until it is known not to be one."""
    from serving.engine import Text as _Text

    tokens = list(ids(pool, "the licensee shall not sublicense"))
    assert len(tokens) > 4
    text = _Text(pool.tokenizer, [stop])
    sent, stopped = [], False
    for i, token in enumerate(tokens):
        new, stopped = text.push(token, final=i == len(tokens) - 1)
        sent.append(new)
        if stopped:
            break
    whole = pool.tokenizer.decode(tokens, skip_special_tokens=True)
    assert stopped and "".join(sent) == whole[: whole.find(stop)]
    no_stop = _Text(pool.tokenizer, ["zebra"])
    assert "".join(no_stop.push(t, final=i == len(tokens) - 1)[0] for i, t in enumerate(tokens)) == whole


def test_single_row_mv_matches_f_linear_for_bf16_rows(monkeypatch):
    import torch

    import serving.engine.prepare as engine
    from serving.engine.decoder import linear

    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 32, bias=False)).to(
        torch.bfloat16
    )
    with torch.inference_mode():
        for shape in [(1, 1, 64), (3, 1, 64), (1, 5, 64)]:
            x = torch.randn(shape, dtype=torch.bfloat16)
            expected = torch.nn.functional.linear(x, layers[0].weight, layers[0].bias)
            got = linear(x, layers[0].weight, layers[0].bias, mv=True)
            assert got.shape == expected.shape
            torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
        # use_gemv routes the modules through it only where mv is the faster path here
        x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
        expected = layers(x)
        for faster in (False, True):
            monkeypatch.setattr(engine, "prefers_mv", lambda weights, faster=faster: faster)
            assert engine.use_gemv(layers) is faster
            assert all(("forward" in m.__dict__) is faster for m in layers)
            torch.testing.assert_close(layers(x).float(), expected.float(), rtol=2e-2, atol=2e-2)
            for m in layers:
                m.__dict__.pop("forward", None)


def test_prefers_mv_picks_the_faster_single_row_path(monkeypatch):
    import types

    import torch

    import serving.engine.decoder as decoder
    import serving.engine.packed as packed

    weights = [torch.randn(64, 32, dtype=torch.bfloat16) for _ in range(3)]
    mv, f_linear = torch.mv, torch.nn.functional.linear
    # The timer sees a clock that only the "slow" path moves: the choice cannot depend on the machine.
    clock = [0.0]
    monkeypatch.setattr(packed, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def slow(fn):
        def wrapped(*args, **kwargs):
            clock[0] += 1.0
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(decoder.torch, "mv", slow(mv))
    assert decoder.prefers_mv(weights) is False
    monkeypatch.setattr(decoder.torch, "mv", mv)
    monkeypatch.setattr(decoder.F, "linear", slow(f_linear))
    assert decoder.prefers_mv(weights) is True


def test_a_failing_request_fails_alone(pool, tiny_app, tmp_path):
    from experts.errors import ArtifactError, UnknownExpertError
    from serving.api import RequestError
    from serving.engine import adapter_version, load_adapters
    from tests.experts.test_adapters import make_unloadable_adapter

    make_unloadable_adapter(tiny_app, tmp_path / "legal_v2", seed=3)  # a retrained legal that does not load
    vocab = pool.model.get_input_embeddings().weight.shape[0]
    good = [
        GenerationRequest(ids(pool, "gene therapy"), {"biomedical": 1.0}, GREEDY),
        GenerationRequest(ids(pool, "the licensee"), {"legal": 1.0}, GREEDY),  # the loaded legal
        GenerationRequest(
            ids(pool, "asyncio"), {"legal": 0.5, "python_docs": 0.5}, SamplingParams(max_tokens=4)
        ),
    ]
    bad = {
        RequestError: GenerationRequest((1, vocab + 5, 2), {"legal": 1.0}, GREEDY),
        RuntimeError: GenerationRequest(  # nothing to sample from: fails at its first token
            ids(pool, "copyright"), {"legal": 1.0}, SamplingParams(max_tokens=10, temperature=float("nan"))
        ),
        ArtifactError: GenerationRequest(
            ids(pool, "copyright"), {"legal": 1.0}, GREEDY, {"legal": (str(tmp_path / "legal_v2"), 2.0)}
        ),
        UnknownExpertError: GenerationRequest(ids(pool, "copyright"), {"lgal": 1.0}, GREEDY),
    }
    batch = [good[0], bad[RequestError], good[1], bad[RuntimeError], bad[ArtifactError], good[2]]
    batch.append(bad[UnknownExpertError])
    versions = {name: adapter_version(folder) for name, folder in pool.adapters.items()}
    before = dict(versions)
    failed = load_adapters(pool, batch, versions)
    assert list(failed) == [4] and versions == before  # the old legal keeps serving
    results = generate(pool, batch, failed)
    for kind, request in bad.items():
        assert isinstance(results[batch.index(request)], kind), (kind, results[batch.index(request)])
    assert "outside the vocabulary" in str(results[1]) and "cannot load adapter" in str(results[4])
    assert [results[batch.index(r)] for r in good] == [generate(pool, [r])[0] for r in good]
    # a batch of failures alone: one step of errors, then the end
    steps = list(decode(pool, [bad[RequestError], bad[UnknownExpertError]]))
    assert len(steps) == 1 and all(d is not None and d.finish_reason == "error" for d in steps[0])


def test_load_adapters_loads_a_new_version_once(pool, tiny_app, serve_artifacts, tmp_path, monkeypatch):
    from serving.engine import load_adapters
    from tests.experts.test_adapters import make_adapter

    make_adapter(tiny_app, tmp_path / "python_docs", seed=11)  # "retrained"
    prompt = ids(pool, "def main():")
    before = generate(pool, [GenerationRequest(prompt, {"python_docs": 1.0}, GREEDY)])[0]
    new = {"python_docs": (str(tmp_path / "python_docs"), 7.0)}
    batch = [GenerationRequest(prompt, {"python_docs": 1.0}, GREEDY, new)] * 2
    versions = {"python_docs": 1.0}
    loads = []
    add = pool.add
    monkeypatch.setattr(pool, "add", lambda name, folder: (loads.append(name), add(name, folder)))
    try:
        assert load_adapters(pool, batch, versions) == {} and versions == {"python_docs": 7.0}
        assert loads == ["python_docs"] and pool.adapters["python_docs"] == tmp_path / "python_docs"
        assert generate(pool, batch[:1])[0] != before
    finally:  # the module's pool serves the original again
        add("python_docs", serve_artifacts / "experts" / "python_docs")

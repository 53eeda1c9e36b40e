"""The lean decoder (`FastBatch`) against peft's `adapter_names` forward (`HFBatch`), the reference:
the same logits (fp32) at the prefill and every decode step, for any mix of adapters and ranks."""

from __future__ import annotations

import pytest
import torch

from experts.adapters import Expansion, ExpertPool
from serving.engine import GenerationRequest, SamplingParams, generate, serving_weights
from serving.engine.batch import start_batch
from serving.engine.decoder import FastBatch, HFBatch
from serving.engine.prepare import lora_stack
from tests.experts.test_adapters import make_adapter

EVERY_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Different ranks, scalings and modules: the stack pads each group to its largest rank.
ADAPTERS = {
    "legal": {},  # r=4 on q, v
    "biomedical": {"r": 8, "target_modules": EVERY_LINEAR},
    "python_docs": {"r": 2, "lora_alpha": 16, "target_modules": ["v_proj", "up_proj", "down_proj"]},
}
ATOL = 1e-5  # fp32; the adapters move the logits by far more (checked in `compare`)


@pytest.fixture(scope="module")
def folders(tiny_app, tmp_path_factory):
    root = tmp_path_factory.mktemp("decoder")
    for seed, (name, lora) in enumerate(ADAPTERS.items()):
        make_adapter(tiny_app, root / name, seed, **lora)
    return {name: root / name for name in ADAPTERS}


def load_pool(app, folders, precision: str = "fp32") -> ExpertPool:
    pool = ExpertPool.load(app, names=[], device="cpu", precision=precision)
    for name, folder in folders.items():
        pool.add(name, folder)
    return pool


@pytest.fixture(scope="module")
def pool(tiny_app, folders):
    return load_pool(tiny_app, folders)


def left_padded(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of these lengths, left-padded to the longest (pad id 0, masked out)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(1, 1000, (n,), generator=gen)
        mask[row, width - n :] = 1
    return ids, mask


def compare(pool, lengths, components, steps: int = 4, drop: dict[int, list[int]] | None = None) -> int:
    """Prefill and decode `steps` tokens (the reference's greedy picks) through both batches;
    after step k, `drop[k]` lists the requests that keep decoding. Returns the comparisons made."""
    ids, mask = left_padded(lengths)
    exp = Expansion.of(components)
    rows_ids, rows_mask = exp.expand(ids), exp.expand(mask)
    fast = start_batch(pool, rows_ids, rows_mask, exp.adapters, ids.shape[1] + steps + 1)
    assert isinstance(fast, FastBatch)
    ref = HFBatch(pool, rows_ids, rows_mask, exp.adapters)
    got, want = fast.prefill(), ref.prefill()
    base = HFBatch(pool, rows_ids, rows_mask, ["base"] * len(exp.adapters)).prefill()
    for row, name in enumerate(exp.adapters):  # each adapter really moves its rows' logits
        assert name == "__base__" or (want[row] - base[row]).abs().max() > 100 * ATOL, name
    compared = 1
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    requests = list(range(len(components)))
    for k in range(steps):
        if drop and k in drop:
            keep = [requests.index(i) for i in drop[k]]
            rows = torch.tensor([r for r, owner in enumerate(exp.owner) if owner in keep])
            fast.select(rows)
            ref.select(rows)
            requests = drop[k]
            exp = Expansion.of([components[i] for i in requests])
            want = want[rows]
        tokens = exp.expand(exp.mix(want).argmax(-1).view(-1, 1))
        got, want = fast.step(tokens), ref.step(tokens)
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
        torch.testing.assert_close(exp.mix(got), exp.mix(want), rtol=0, atol=ATOL)
        compared += 1
    return compared


CASES = {
    "one adapter for every row": ([5, 9, 2], [{"biomedical": 1.0}] * 3),
    "one adapter padded to the group's rank": ([3, 7], [{"python_docs": 1.0}] * 2),
    "two adapters and the base": ([3, 8, 6], [{"legal": 1.0}, {"biomedical": 1.0}, {"base": 1.0}]),
    "a mixture of two experts": ([4, 10], [{"legal": 0.3, "biomedical": 0.7}, {"python_docs": 1.0}]),
    "every row the base": ([6, 2], [{"base": 1.0}] * 2),
}


@pytest.mark.parametrize("lengths,components", CASES.values(), ids=list(CASES))
def test_fast_batch_equals_peft(pool, lengths, components):
    assert compare(pool, lengths, components, steps=5) == 6


def test_fast_batch_equals_peft_after_rows_leave(pool):
    components = [{"legal": 1.0}, {"biomedical": 0.5, "base": 0.5}, {"biomedical": 1.0}, {"python_docs": 1.0}]
    # mixed -> still mixed (a mixture's two rows leave together) -> one adapter for every row
    assert compare(pool, [7, 3, 5, 9], components, steps=6, drop={2: [0, 2, 3], 4: [2]}) == 7


def test_a_merged_batch_equals_peft_for_every_row(pool):
    """FastBatch.merge: batch B (its own prompt widths, adapters and cache length) joins batch A
    after A's second step; every row's logits stay those of peft on its own batch."""
    batches = []
    for lengths, adapters, seed in (
        ([5, 9], ["legal", "biomedical"], 0),
        ([3, 2, 6], ["__base__", "python_docs", "legal"], 1),
    ):
        ids, mask = left_padded(lengths, seed)
        batches.append((start_batch(pool, ids, mask, adapters, 12), HFBatch(pool, ids, mask, adapters)))
    (fast_a, ref_a), (fast_b, ref_b) = batches
    assert isinstance(fast_a, FastBatch) and isinstance(fast_b, FastBatch)
    want_a, want_b = ref_a.prefill(), ref_b.prefill()
    fast_a.prefill(), fast_b.prefill()
    for _ in range(2):
        tokens = want_a.argmax(-1, keepdim=True)
        fast_a.step(tokens)
        want_a = ref_a.step(tokens)
    fast_a.merge(fast_b)
    assert fast_a.k.shape[1] == 5 and fast_a.length == max(9 + 2, 6)
    for _ in range(3):
        tokens_a, tokens_b = want_a.argmax(-1, keepdim=True), want_b.argmax(-1, keepdim=True)
        got = fast_a.step(torch.cat([tokens_a, tokens_b]))
        want_a, want_b = ref_a.step(tokens_a), ref_b.step(tokens_b)
        torch.testing.assert_close(got, torch.cat([want_a, want_b]), rtol=0, atol=ATOL)


def test_greedy_decode_is_the_same_on_both_paths(pool):
    def request(text, experts, **params):
        ids = tuple(pool.tokenizer(text).input_ids)
        return GenerationRequest(ids, experts, SamplingParams(**{"max_tokens": 12, **params}))

    requests = [
        request("what is the dose of insulin", {"biomedical": 1.0}),
        request("copyright", {"legal": 1.0}, max_tokens=4),  # leaves early: the batch drops its rows
        request("how does asyncio run a list of tasks", {"base": 1.0}),
        request("the licensee may", {"legal": 0.5, "python_docs": 0.5}, repetition_penalty=1.3),
    ]
    fast, slow = generate(pool, requests, fast=True), generate(pool, requests, fast=False)
    assert fast == slow
    assert [r[1] for r in fast] == [12, 4, 12, 12]


def test_bf16_serving_keeps_the_lora_fp32_and_stacked(tiny_app, folders, tmp_path):
    pool = load_pool(tiny_app, {"legal": folders["legal"]}, precision="bf16")
    serving_weights(pool)
    make_adapter(tiny_app, tmp_path / "late", seed=9, r=8, target_modules=["q_proj", "o_proj", "up_proj"])
    pool.add("late", tmp_path / "late")  # added while serving: after the cast
    stack = lora_stack(pool)
    assert stack is not None
    stacked = {t.untyped_storage().data_ptr() for g in stack.groups.values() for t in (g.a, *g.b)}
    layers = pool.model.config.num_hidden_layers  # every LoRA A and B kept: legal q, v; late q, o, up
    assert sum("lora_" in name for name, _ in pool.model.named_parameters()) == 2 * (2 + 3) * layers
    for name, param in pool.model.named_parameters():
        if "lora_" in name:  # peft computes with views into the fp32 stack: one copy, full precision
            assert param.dtype == torch.float32 and param.untyped_storage().data_ptr() in stacked, name
        else:
            assert param.dtype == torch.bfloat16, name
    ids, mask = left_padded([4, 7, 5])
    adapters = ["legal", "late", "__base__"]
    fast = start_batch(pool, ids, mask, adapters, 12)
    assert isinstance(fast, FastBatch)
    ref = HFBatch(pool, ids, mask, adapters)
    got, want = fast.prefill().float(), ref.prefill().float()
    torch.testing.assert_close(got, want, rtol=0, atol=0.02 * want.abs().max().item())  # bf16 rounding
    rows = torch.tensor([1])  # one row left: its linears go through torch.mv
    fast.select(rows)
    ref.select(rows)
    for _ in range(3):
        tokens = want[rows].argmax(-1, keepdim=True)
        got, want = fast.step(tokens).float(), ref.step(tokens).float()
        torch.testing.assert_close(got, want, rtol=0, atol=0.02 * want.abs().max().item())  # bf16 rounding
        rows = torch.tensor([0])


def test_bf16_batches_decode_the_same_with_either_cache_dtype(tiny_app, folders, monkeypatch):
    import serving.engine.decoder as decoder

    pool = load_pool(tiny_app, folders, precision="bf16")
    serving_weights(pool)
    lengths = [4, 7, 5, 2, 6, 3, 7, 5, 4, 6]  # more rows than keep an fp32 cache
    ids, mask = left_padded(lengths)
    adapters = ["legal", "biomedical", "__base__", "python_docs", "legal"] * 2

    def decode(fp32_rows: int) -> tuple[torch.dtype, list[torch.Tensor]]:
        monkeypatch.setattr(decoder, "FP32_CACHE_ROWS", fp32_rows)
        batch = start_batch(pool, ids, mask, adapters, 12)
        assert isinstance(batch, FastBatch)
        logits = [batch.prefill()]
        for _ in range(3):
            logits.append(batch.step(logits[-1].argmax(-1, keepdim=True)))
        return batch.k.dtype, logits

    (small, got), (big, want) = decode(len(lengths)), decode(len(lengths) - 1)
    assert (small, big) == (torch.float32, torch.bfloat16)
    for a, b in zip(got, want, strict=True):  # bf16 values held in fp32: the very same numbers
        assert torch.equal(a, b)


def test_a_replaced_adapter_is_restacked(tiny_app, folders, tmp_path):
    pool = load_pool(tiny_app, folders)
    ids, mask = left_padded([5, 3])
    before = start_batch(pool, ids, mask, ["legal", "biomedical"], 8).prefill()
    make_adapter(tiny_app, tmp_path / "legal_v2", seed=5, r=16, target_modules=EVERY_LINEAR)
    pool.add("legal", tmp_path / "legal_v2")
    got = start_batch(pool, ids, mask, ["legal", "biomedical"], 8).prefill()
    torch.testing.assert_close(
        got, HFBatch(pool, ids, mask, ["legal", "biomedical"]).prefill(), rtol=0, atol=ATOL
    )
    assert (got[0] - before[0]).abs().max() > 100 * ATOL  # the new version serves
    torch.testing.assert_close(got[1], before[1], rtol=0, atol=ATOL)  # the others are untouched


UNSTACKABLE = {  # (DoRA is refused at loading: peft cannot mix it with other adapters in a batch)
    "a LoRA bias": {"lora_bias": True},
    "LoRA on the embeddings": {"target_modules": ["q_proj", "embed_tokens"]},
}


@pytest.mark.parametrize("lora", UNSTACKABLE.values(), ids=list(UNSTACKABLE))
def test_an_adapter_the_stack_cannot_hold_is_served_by_peft(tiny_app, folders, tmp_path, lora):
    pool = load_pool(tiny_app, {"legal": folders["legal"]})
    make_adapter(tiny_app, tmp_path / "odd", seed=4, **lora)
    pool.add("odd", tmp_path / "odd")
    assert lora_stack(pool) is None
    ids, mask = left_padded([4, 6])
    batch = start_batch(pool, ids, mask, ["odd", "legal"], 10)
    assert isinstance(batch, HFBatch)
    torch.testing.assert_close(batch.prefill(), pool.forward(ids, mask, ["odd", "legal"]).logits[:, -1])
    request = GenerationRequest(tuple(range(5, 12)), {"odd": 1.0}, SamplingParams(max_tokens=6))
    served = generate(pool, [request])[0]
    assert not isinstance(served, Exception) and served == generate(pool, [request], fast=False)[0]
    pool.remove("odd")  # the rest can be stacked again: the fast path is back
    assert lora_stack(pool) is not None and isinstance(
        start_batch(pool, ids, mask, ["legal"] * 2, 10), FastBatch
    )


def test_lora_on_a_module_the_lean_forward_lacks_falls_back(tiny_app, folders, tmp_path):
    pool = load_pool(tiny_app, {"legal": folders["legal"]})
    make_adapter(tiny_app, tmp_path / "head", seed=6, target_modules=["q_proj", "lm_head"])
    pool.add("head", tmp_path / "head")
    assert lora_stack(pool) is not None  # stackable, but FastBatch has no LoRA on lm_head
    ids, mask = left_padded([3, 5])
    assert isinstance(start_batch(pool, ids, mask, ["head", "legal"], 8), HFBatch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_attention_equals_sdpa(dtype):
    from serving.engine.decoder import attend, decode_bias

    gen = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, columns, dim = 3, 6, 2, 11, 16
    q = torch.randn(rows, heads, 1, dim, generator=gen).to(dtype)
    k, v = (torch.randn(rows, kv_heads, columns, dim, generator=gen).to(dtype) for _ in range(2))
    allowed = torch.rand(rows, 1, 1, columns, generator=gen) > 0.4  # ragged padding
    allowed[..., -1] = True  # every row sees its own new column
    got = attend(q, k, v, allowed)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    assert got.dtype == dtype and got.shape == want.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=tol)
    # the mask matters: letting every column through changes the answer
    assert (attend(q, k, v, torch.ones_like(allowed)) - got).abs().max() > 10 * tol
    # what the decoder passes: the bias made once per step, and an fp32 cache for bf16 queries
    assert torch.equal(attend(q, k.float(), v.float(), decode_bias(allowed, kv_heads)), got)

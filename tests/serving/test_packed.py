"""Packed base weights (`serving.engine.packed`): the kernels compute what plain weights do, int4 packs
only weights already on a 4-bit grid, and a packed pool decodes the same on both paths, frees its
plain weights and still takes new adapters. `auto` tries oneDNN for a bf16 pool on a CPU with
native bf16 and bf16 storage for an fp32 pool on one without (the CPU probe injected, no timing)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import serving.engine.packed as packed_module
from experts.adapters import ExpertPool
from experts.hardware import parse_cpuinfo
from serving.engine import serving_weights
from serving.engine.batch import start_batch
from serving.engine.decoder import FastBatch, HFBatch
from serving.engine.packed import (
    GROUP,
    PackedLinear,
    auto_format,
    layout,
    pack,
    packed_group,
    packed_groups,
    sibling_groups,
    with_wide,
)
from serving.engine.prepare import decoder_for
from tests.experts.test_adapters import make_adapter
from tests.serving.test_decoder import left_padded

# oneDNN's bf16 layout needs AVX512 (or AVX-NE-CONVERT): not there on an AVX2-only CPU
ONEDNN = torch.ops.mkldnn._is_mkldnn_bf16_supported()
needs_onednn = pytest.mark.skipif(not ONEDNN, reason="oneDNN bf16 needs AVX512 or AVX-NE-CONVERT")


AVX2 = parse_cpuinfo("model name\t: AMD EPYC\nflags\t\t: sse2 avx avx2 fma f16c\n", env={})
BF16 = parse_cpuinfo("model name\t: AMD EPYC\nflags\t\t: avx2 fma avx512f avx512_bf16\n", env={})
BF16_CAPPED = parse_cpuinfo(
    "model name\t: AMD EPYC\nflags\t\t: avx2 fma avx512f avx512_bf16\n", env={"ATEN_CPU_CAPABILITY": "avx2"}
)


def on_grid(w: torch.Tensor) -> torch.Tensor:
    """w moved onto a Q4_1-style grid: per GROUP inputs, min + q * (max - min) / 15, q in 0..15."""
    g = w.detach().float().view(w.shape[0], -1, GROUP)
    low, step = g.amin(-1, keepdim=True), (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 15
    return (torch.round((g - low) / step) * step + low).view_as(w)


@needs_onednn
def test_onednn_packing_is_bit_for_bit_f_linear():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(48, 64, generator=gen), torch.randn(16, 64, generator=gen)
    group = pack([a, b], "onednn")
    assert group is not None and (group.in_features, group.out_features) == (64, 64)
    plain = torch.cat([a, b]).to(torch.bfloat16)
    for shape in [(1, 64), (1, 1, 64), (3, 5, 64)]:
        x = torch.randn(shape, generator=gen).to(torch.bfloat16)
        assert torch.equal(group(x), F.linear(x, plain))


def test_int4_packs_only_weights_on_a_4_bit_grid():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=gen)
    assert pack([w], "int4") is None  # off the grid: packing would change the model
    grid = on_grid(w)
    group = pack([grid[:16], grid[16:]], "int4")
    assert group is not None and group.nbytes() < grid.numel()  # under a byte a weight
    x = torch.randn(3, 64, generator=gen).to(torch.bfloat16)
    want = F.linear(x.float(), grid)
    # bf16 activations and scales: what a bf16 copy of the weights costs, no more
    bf16 = F.linear(x, grid.to(torch.bfloat16)).float()
    tol = 3 * (bf16 - want).abs().max().item() + 1e-3
    torch.testing.assert_close(group(x).float(), want, rtol=0, atol=tol)
    assert pack([on_grid(torch.randn(24, 64, generator=gen))], "int4") is None  # rows: not 16s


def grid_pool(app, folders, fmt: str, cpu=None) -> ExpertPool:
    """A bf16 pool of the tiny model with its layers' weights on a 4-bit grid, served as `fmt`."""
    pool = ExpertPool.load(app, names=[], device="cpu", precision="bf16")
    with torch.no_grad():
        for linears in sibling_groups(pool.model):
            for m in linears:
                m.weight.copy_(on_grid(m.weight))
    for name, folder in folders.items():
        pool.add(name, folder)
    serving_weights(pool, fmt, cpu)
    return pool


@pytest.fixture(scope="module")
def adapters(tiny_app, tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    make_adapter(tiny_app, root / "legal", 0)
    make_adapter(
        tiny_app, root / "biomedical", 1, r=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]
    )
    return {"legal": root / "legal", "biomedical": root / "biomedical"}


@pytest.mark.parametrize("fmt", [pytest.param("onednn", marks=needs_onednn), "int4"])
def test_a_packed_pool_decodes_like_plain_bf16(tiny_app, adapters, tmp_path, fmt):
    plain, packed = grid_pool(tiny_app, adapters, "plain"), grid_pool(tiny_app, adapters, fmt)
    assert layout(plain.model) == "plain" and layout(packed.model) == fmt
    layers = packed.model.config.num_hidden_layers
    assert len(packed_groups(packed.model)) == 4 * layers  # qkv, o, gate_up, down
    base = packed.model.get_base_model()
    att = base.model.layers[0].self_attn
    assert packed_group([att.q_proj, att.k_proj, att.v_proj]) is not None
    leftover = [n for n, _ in packed.model.named_parameters() if "lora_" not in n and "proj" in n]
    assert leftover == []  # the plain weights are gone, not kept beside the packed ones
    make_adapter(tiny_app, tmp_path / "late", 9, r=4, target_modules=["o_proj", "up_proj"])
    for pool in (plain, packed):  # an adapter loaded after packing wraps the packed modules
        pool.add("late", tmp_path / "late")
    ids, mask = left_padded([4, 7, 5])
    rows = ["legal", "late", "biomedical"]
    fast, ref = start_batch(packed, ids, mask, rows, 12), HFBatch(packed, ids, mask, rows)
    want = start_batch(plain, ids, mask, rows, 12)
    assert isinstance(fast, FastBatch) and isinstance(want, FastBatch)
    got, hf, expected = fast.prefill().float(), ref.prefill().float(), want.prefill().float()
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, hf, rtol=0, atol=1e-2 * scale)  # both paths compute the same
    torch.testing.assert_close(got, expected, rtol=0, atol=(0.01 if fmt == "onednn" else 0.03) * scale)
    for _ in range(3):
        tokens = expected.argmax(-1, keepdim=True)
        got, expected = fast.step(tokens).float(), want.step(tokens).float()
        torch.testing.assert_close(got, expected, rtol=0, atol=(0.01 if fmt == "onednn" else 0.03) * scale)


@needs_onednn
def test_auto_packs_with_onednn_only_where_it_is_faster(tiny_app, adapters, monkeypatch, caplog):
    for faster, expected in ((True, "onednn"), (False, "plain")):
        monkeypatch.setattr(
            packed_module, "packed_is_faster", lambda groups, packs, dtype, faster=faster: faster
        )
        assert layout(grid_pool(tiny_app, adapters, "auto", BF16).model) == expected
    # int4 asked of weights off the grid packs nothing: the model would change
    pool = ExpertPool.load(tiny_app, names=[], device="cpu", precision="bf16")
    serving_weights(pool, "int4")
    assert layout(pool.model) == "plain"
    assert "no layer's weights are on a 4-bit grid" in caplog.text


def test_bf16_storage_computes_in_fp32():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(700, 64, generator=gen), torch.randn(300, 64, generator=gen)  # > CHUNK_ROWS rows
    group = pack([a, b], "bf16")
    assert group is not None and group.weight.dtype == torch.bfloat16 and group.nbytes() == 2 * 1000 * 64
    stored = torch.cat([a, b]).to(torch.bfloat16).float()
    for shape in [(3, 5, 64), (2, 64)]:  # several rows: the stored values widened, an fp32 matmul
        x = torch.randn(shape, generator=gen)
        y = group(x)
        assert y.dtype == torch.float32 and y.shape == (*shape[:-1], 1000)
        torch.testing.assert_close(y, F.linear(x, stored), rtol=1e-5, atol=1e-5)
    # one row: ATen's bf16 GEMV, the row rounded to bf16 on the way in, accumulated in fp32
    x = torch.randn(1, 1, 64, generator=gen)
    y, want = group(x), F.linear(x, stored)
    rounded = F.linear(x.to(torch.bfloat16).float(), stored)
    torch.testing.assert_close(y, rounded, rtol=0, atol=1e-2 * rounded.abs().max().item())
    assert (y - want).abs().max() <= 3 * (rounded - want).abs().max() + 1e-2 * want.abs().max()
    # with the fp32 copy for batches: several rows through oneDNN's fp32 kernel, one row unchanged
    both = with_wide(group)
    assert both.wide is not None and both.row_bytes() == group.nbytes()
    assert both.nbytes() == group.nbytes() + 4 * 1000 * 64
    for shape in [(3, 5, 64), (2, 64)]:
        x = torch.randn(shape, generator=gen)
        torch.testing.assert_close(both(x), F.linear(x, stored), rtol=1e-5, atol=1e-5)
    x = torch.randn(1, 1, 64, generator=gen)
    assert torch.equal(both(x), group(x))


def test_auto_format_follows_the_cpu():
    # no native bf16 (or torch capped below it): an fp32 pool stores its weights in bf16
    assert auto_format(torch.float32, AVX2) == "bf16"
    assert auto_format(torch.float32, BF16_CAPPED) == "bf16"
    # native bf16: an fp32 pool was asked for (precision=fp32), kept; a bf16 pool tries oneDNN
    assert auto_format(torch.float32, BF16) is None
    assert auto_format(torch.bfloat16, BF16) == ("onednn" if ONEDNN else None)
    assert auto_format(torch.bfloat16, AVX2) is None


def fp32_pool(app, folders, fmt: str, cpu) -> ExpertPool:
    pool = ExpertPool.load(app, names=[], device="cpu", precision="fp32")
    for name, folder in folders.items():
        pool.add(name, folder)
    serving_weights(pool, fmt, cpu)
    return pool


@pytest.mark.parametrize("copy", [False, True], ids=["bf16 alone", "with an fp32 copy for batches"])
def test_an_fp32_pool_without_native_bf16_serves_bf16_storage(tiny_app, adapters, monkeypatch, copy):
    monkeypatch.setattr(packed_module, "packed_is_faster", lambda groups, packs, dtype: True)
    monkeypatch.setattr(packed_module, "wide_is_faster", lambda packs, wide: copy)
    plain, packed = fp32_pool(tiny_app, adapters, "plain", AVX2), fp32_pool(tiny_app, adapters, "auto", AVX2)
    assert layout(plain.model) == "plain" and layout(packed.model) == "bf16"
    leftover = [n for n, _ in packed.model.named_parameters() if "lora_" not in n and "proj" in n]
    assert leftover == []  # the fp32 layer weights are gone
    assert packed.dtype == torch.float32
    fast_decoder = decoder_for(packed)
    assert isinstance(fast_decoder.lm_head, PackedLinear) and fast_decoder.lm_head.kind == "bf16"
    groups = packed_groups(packed.model)
    assert groups and all((g.wide is not None) == copy for g in [*groups, fast_decoder.lm_head])
    plain_decoder = decoder_for(plain)
    assert plain_decoder is not None and not isinstance(plain_decoder.lm_head, PackedLinear)
    assert 2 * fast_decoder.token_bytes() == plain_decoder.token_bytes()  # half the bytes a token
    ids, mask = left_padded([4, 7, 5])
    rows = ["legal", "base", "biomedical"]
    fast, ref = start_batch(packed, ids, mask, rows, 12), HFBatch(packed, ids, mask, rows)
    want = start_batch(plain, ids, mask, rows, 12)
    assert isinstance(fast, FastBatch)
    got, hf, expected = fast.prefill(), ref.prefill(), want.prefill()
    assert got.dtype == torch.float32
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, hf, rtol=0, atol=1e-2 * scale)  # both paths compute the same
    torch.testing.assert_close(got, expected, rtol=0, atol=0.01 * scale)  # bf16's rounding, no more
    for _ in range(3):
        tokens = expected.argmax(-1, keepdim=True)
        got, expected = fast.step(tokens), want.step(tokens)
        torch.testing.assert_close(got, expected, rtol=0, atol=0.01 * scale)
    fast.select(torch.tensor([1]))  # one row left: the single-row kernel
    want.select(torch.tensor([1]))
    tokens = expected[1:2].argmax(-1, keepdim=True)
    torch.testing.assert_close(fast.step(tokens), want.step(tokens), rtol=0, atol=0.01 * scale)


def test_bf16_storage_is_not_tried_where_the_cpu_has_native_bf16(tiny_app, adapters, monkeypatch):
    def never(*args):
        raise AssertionError("nothing to time: auto has no format to try here")

    monkeypatch.setattr(packed_module, "packed_is_faster", never)
    assert layout(fp32_pool(tiny_app, adapters, "auto", BF16).model) == "plain"
    # and where it is tried, the timing decides
    monkeypatch.setattr(packed_module, "packed_is_faster", lambda groups, packs, dtype: False)
    assert layout(fp32_pool(tiny_app, adapters, "auto", AVX2).model) == "plain"

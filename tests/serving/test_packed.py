"""Packed base weights (`serving.packed`): the kernels compute what plain weights do, int4 packs
only weights already on a 4-bit grid, and a packed pool decodes the same on both paths, frees its
plain weights and still takes new adapters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import serving.packed as packed_module
from experts.adapters import ExpertPool
from serving.decoder import FastBatch, HFBatch, start_batch
from serving.engine import serving_weights
from serving.packed import GROUP, layout, pack, packed_group, packed_groups, sibling_groups
from tests.experts.test_adapters import make_adapter
from tests.serving.test_decoder import left_padded


def on_grid(w: torch.Tensor) -> torch.Tensor:
    """w moved onto a Q4_1-style grid: per GROUP inputs, min + q * (max - min) / 15, q in 0..15."""
    g = w.detach().float().view(w.shape[0], -1, GROUP)
    low, step = g.amin(-1, keepdim=True), (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 15
    return (torch.round((g - low) / step) * step + low).view_as(w)


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


def grid_pool(app, folders, fmt: str) -> ExpertPool:
    """A bf16 pool of the tiny model with its layers' weights on a 4-bit grid, served as `fmt`."""
    pool = ExpertPool.load(app, names=[], device="cpu", precision="bf16")
    with torch.no_grad():
        for linears in sibling_groups(pool.model):
            for m in linears:
                m.weight.copy_(on_grid(m.weight))
    for name, folder in folders.items():
        pool.add(name, folder)
    serving_weights(pool, fmt)
    return pool


@pytest.fixture(scope="module")
def adapters(tiny_app, tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    make_adapter(tiny_app, root / "legal", 0)
    make_adapter(
        tiny_app, root / "biomedical", 1, r=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]
    )
    return {"legal": root / "legal", "biomedical": root / "biomedical"}


@pytest.mark.parametrize("fmt", ["onednn", "int4"])
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


def test_auto_packs_with_onednn_only_where_it_is_faster(tiny_app, adapters, monkeypatch, caplog):
    for faster, expected in ((True, "onednn"), (False, "plain")):
        monkeypatch.setattr(packed_module, "onednn_is_faster", lambda groups, packs, faster=faster: faster)
        assert layout(grid_pool(tiny_app, adapters, "auto").model) == expected
    # int4 asked of weights off the grid packs nothing: the model would change
    pool = ExpertPool.load(tiny_app, names=[], device="cpu", precision="bf16")
    serving_weights(pool, "int4")
    assert layout(pool.model) == "plain"
    assert "no layer's weights are on a 4-bit grid" in caplog.text

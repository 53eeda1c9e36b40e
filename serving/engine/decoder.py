"""The decode batch: one forward pass per step for every row of a batch, with its own KV cache.

Two implementations of one interface (`start_batch`):
- `FastBatch`, a lean forward of Llama-family models (SmolLM2 is one): the Hugging Face model's
  own weights and math, with what costs time at small batches on a CPU taken out. q/k/v and
  gate/up are one matmul each (fused weights; the HF modules keep views into them, so nothing is
  stored twice); a single row goes through `torch.mv` or F.linear, whichever reads this model's
  weights faster on this CPU (`prefers_mv`, timed once per decoder: the faster one differs between
  CPUs, docs/benchmarks.md#on-an-amd-epyc-kernels-chosen-by-timing-packed-base-weights-2026-12-01-late); the KV cache is preallocated per batch; RoPE comes from a
  table; a decode step's attention runs in fp32 over an fp32 cache (small batches) with its mask
  made once for every layer; LoRA comes from the pool's `LoraStack`: one adapter for every row ->
  two matmuls per group (`LoraGroup.for_one`, made once per batch), a mix -> one matmul against
  every adapter's A, a per-row mask, one matmul per module against every B. A test holds its
  logits to peft's `adapter_names` forward.
  Where an fp32 pool's layers are stored in bf16 (`serving.engine.packed`, a CPU without native bf16),
  the decoder keeps a bf16 copy of the LM head too.
- `HFBatch`: the Hugging Face model through peft (`ExpertPool.forward`, a DynamicCache), for every
  other architecture or adapter kind (DoRA, LoRA on embeddings).

Rows are left-padded: the padding columns are masked out of attention and positions count real
tokens only, so a row decodes the same tokens alone or in a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from experts.adapters import ExpertPool
from serving.engine.layout import layer_lora_keys
from serving.engine.lora import LoraGroup, LoraStack
from serving.engine.packed import PackedLinear, fastest, pack, packed_group, with_wide

_ROPE_TYPES = {"default", "linear", "llama3"}  # cos/sin depend on the position only (a table works)
FP32_CACHE_ROWS = 8  # batches of at most this many rows keep their KV cache in fp32 on a CPU


def linear(
    x: torch.Tensor, weight: torch.Tensor | PackedLinear, bias: torch.Tensor | None = None, mv: bool = True
) -> torch.Tensor:
    """F.linear, but with mv=True a single row on the CPU goes through `torch.mv`; mixed dtypes
    stay with F.linear. Which of the two reads a bf16 weight faster depends on the CPU (`prefers_mv`).
    Packed weights (`serving.engine.packed`) go through their own kernel."""
    if isinstance(weight, PackedLinear):
        y = weight(x)
        return y if bias is None else y + bias
    if mv and x.numel() == x.shape[-1] and x.device.type == "cpu" and x.dtype == weight.dtype:
        y = torch.mv(weight, x.reshape(-1))
        return (y if bias is None else y + bias).view(*x.shape[:-1], -1)
    return F.linear(x, weight, bias)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Attention of q [rows, heads, T, dim] over the cache k, v [rows, kv_heads, S, dim] where
    `allowed` [rows, 1, T, S] (bool); [rows, heads, T, dim]. One new column per row on the CPU (a
    decode step) is three fp32 ops over the grouped heads: torch's CPU SDPA kernel costs more there,
    the more rows and cached columns the more (docs/benchmarks.md#on-an-amd-epyc-kernels-chosen-by-timing-packed-base-weights-2026-12-01-late). There
    `allowed` may instead be `decode_bias(allowed, kv_heads)`, computed once for every layer."""
    rows, heads, steps, dim = q.shape
    kv_heads = k.shape[1]
    if steps != 1 or q.device.type != "cpu":
        k, v = k.to(q.dtype), v.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    bias = decode_bias(allowed, kv_heads) if allowed.dtype == torch.bool else allowed
    grouped = q.reshape(rows * kv_heads, heads // kv_heads, dim).float()  # q head h reads kv head h // group
    keys, values = (t.reshape(rows * kv_heads, -1, dim).float() for t in (k, v))  # views of an fp32 cache
    scores = torch.baddbmm(bias, grouped, keys.transpose(1, 2), alpha=dim**-0.5)
    return torch.bmm(torch.softmax(scores, dim=-1), values).view(rows, heads, 1, dim).to(q.dtype)


def decode_bias(allowed: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """A decode step's mask `allowed` [rows, 1, 1, S] as `attend`'s additive fp32 bias
    [rows * kv_heads, 1, S]: 0 where allowed, -inf elsewhere."""
    rows, columns = allowed.shape[0], allowed.shape[-1]
    bias = torch.zeros(rows, 1, columns, device=allowed.device)
    return bias.masked_fill_(~allowed.view(rows, 1, columns), float("-inf")).repeat_interleave(kv_heads, 0)


def prefers_mv(weights: Sequence[torch.Tensor], rounds: int = 3) -> bool:
    """Whether `torch.mv` multiplies one row by these weights faster than F.linear's single-row
    path, timed here over all of them (a batch-1 token's worth when they are a model's): which one
    wins depends on the CPU and its BLAS paths: mv on an Intel Xeon with AMX, F.linear on an AMD EPYC
    (docs/benchmarks.md#on-an-amd-epyc-kernels-chosen-by-timing-packed-base-weights-2026-12-01-late).
    Off the CPU: False (F.linear)."""
    if not weights or weights[0].device.type != "cpu":
        return False
    rows = {(w.shape[1], w.dtype): torch.randn(w.shape[1]).to(w.dtype) for w in weights}

    def run(mv: bool) -> Callable[[], object]:
        return lambda: [linear(rows[w.shape[1], w.dtype], w, mv=mv) for w in weights]

    return fastest({"mv": run(True), "linear": run(False)}, rounds) == "mv"


def _fuse(linears: Sequence[Any]) -> torch.Tensor | PackedLinear:
    """One weight for linears that read the same input: the group they were packed as
    (`serving.engine.packed`), else one tensor, and the modules are left holding views of it."""
    group = packed_group(linears)
    if group is not None:
        return group
    bases = [getattr(m, "base_layer", m) for m in linears]
    if len(bases) == 1:
        return bases[0].weight
    fused = torch.cat([b.weight.detach() for b in bases])
    at = 0
    for b in bases:
        rows = b.weight.shape[0]
        b.weight.data = fused[at : at + rows]
        at += rows
    return fused


def fast_path_problem(model: Any) -> str | None:
    """Why `FastBatch` cannot run this HF causal LM (None: it can)."""
    config = model.config
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    checks = {
        "model_type is not llama": config.model_type != "llama",
        "attention or MLP bias": bool(
            getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)
        ),
        "activation is not silu": config.hidden_act != "silu",
        "rope type": rope.get("rope_type", "default") not in _ROPE_TYPES,
        "pretraining_tp": getattr(config, "pretraining_tp", 1) != 1,
    }
    return next((why for why, bad in checks.items() if bad), None)


@dataclass
class _Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv: torch.Tensor | PackedLinear  # fused [q + 2 kv, hidden]
    o: torch.Tensor | PackedLinear
    gate_up: torch.Tensor | PackedLinear  # fused [2 intermediate, hidden]
    down: torch.Tensor | PackedLinear
    lora: tuple[str, str, str, str]  # the LoRA groups' keys of qkv, o, gate_up, down


class Decoder:
    """The weights of a Llama-family HF model, arranged for `FastBatch` (built once per pool)."""

    def __init__(self, model: Any):
        config, inner = model.config, model.model
        self.model = model
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.hidden = config.hidden_size
        self.intermediate = config.intermediate_size
        self.eps = config.rms_norm_eps
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.lm_head: torch.Tensor | PackedLinear = model.get_output_embeddings().weight
        self.rotary = inner.rotary_emb
        self.dtype = self.embed.dtype
        self.layers = []
        with torch.no_grad():
            for i, layer in enumerate(inner.layers):
                att, mlp = layer.self_attn, layer.mlp
                self.layers.append(
                    _Layer(
                        layer.input_layernorm.weight,
                        layer.post_attention_layernorm.weight,
                        _fuse([att.q_proj, att.k_proj, att.v_proj]),
                        _fuse([att.o_proj]),
                        _fuse([mlp.gate_proj, mlp.up_proj]),
                        _fuse([mlp.down_proj]),
                        layer_lora_keys(i),
                    )
                )
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.slices = {
            "q_proj": slice(0, q),
            "k_proj": slice(q, q + kv),
            "v_proj": slice(q + kv, q + 2 * kv),
            "gate_proj": slice(0, self.intermediate),
            "up_proj": slice(self.intermediate, 2 * self.intermediate),
        }
        self._cos = self._sin = torch.empty(0)
        if isinstance(self.layers[0].qkv, PackedLinear) and self.layers[0].qkv.kind == "bf16":
            # The layers' weights are stored in bf16 (an fp32 pool, `serving.engine.packed`): so is a copy
            # of the LM head (a fifth of a token's bytes; the fp32 one stays, tied to the embeddings)
            self.lm_head = pack([self.lm_head], "bf16") or self.lm_head
            if self.layers[0].qkv.wide is not None and isinstance(self.lm_head, PackedLinear):
                self.lm_head = with_wide(self.lm_head)  # as the layers: fp32 for batches
        # A batch-1 token's weights, to time the two single-row paths on this CPU
        weights = [w for layer in self.layers for w in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        self.mv = prefers_mv([w for w in (*weights, self.lm_head) if isinstance(w, torch.Tensor)])

        self.lora_keys = {key for layer in self.layers for key in layer.lora}

    def token_bytes(self) -> int:
        """Bytes of base weights one batch-1 token reads, in the layout served: every layer's
        linears and the LM head (the embedding row and the norms are noise). Divided into the
        measured read bandwidth, the roofline of batch-1 decoding (benchmarks/)."""

        def size(w: torch.Tensor | PackedLinear) -> int:
            return w.row_bytes() if isinstance(w, PackedLinear) else w.numel() * w.element_size()

        layers = sum(
            size(w) for layer in self.layers for w in (layer.qkv, layer.o, layer.gate_up, layer.down)
        )
        return layers + size(self.lm_head)

    def cache_dtype(self, rows: int) -> torch.dtype:
        """The KV cache's dtype for a batch of `rows`. The decode attention computes in fp32 on a
        CPU (`attend`): an fp32 cache spares it converting every cached column of every layer at
        every step (the same values: bf16 fits in fp32), which counts at batch 1. Up to
        FP32_CACHE_ROWS rows only: the cache of a big batch would double, for no measured gain."""
        cpu = self.embed.device.type == "cpu"
        return torch.float32 if cpu and rows <= FP32_CACHE_ROWS else self.dtype

    def rope(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [length, head_dim] for positions 0..length-1 (sin with rotate_half's sign folded in)."""
        if self._cos.shape[0] < length:
            size = max(length, 2 * self._cos.shape[0], 256)
            probe = torch.empty(0, dtype=self.dtype, device=self.embed.device)
            cos, sin = self.rotary(probe, torch.arange(size, device=self.embed.device)[None])
            half = self.head_dim // 2
            # rotate_half(x) * sin == flip(x halves) * [-sin, sin]
            self._cos, self._sin = cos[0], torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)
        return self._cos, self._sin


class FastBatch:
    """One decode batch on the lean forward: its KV cache, its real-token columns, its rows' adapters."""

    def __init__(
        self,
        pool: ExpertPool,
        decoder: Decoder,
        stack: LoraStack,
        ids: torch.Tensor,
        mask: torch.Tensor,
        adapters: Sequence[str],
        capacity: int,
    ):
        self.pool, self.d, self.stack = pool, decoder, stack
        device = decoder.embed.device
        rows, width = ids.shape
        with torch.inference_mode():
            self.ids = ids.to(device)
            self.valid = torch.zeros(rows, capacity, dtype=torch.bool, device=device)
            self.valid[:, :width] = mask.to(device).bool()
            self.positions = (self.valid[:, :width].long().cumsum(-1) - 1).clamp(min=0)
            shape = (len(decoder.layers), rows, decoder.kv_heads, capacity, decoder.head_dim)
            self.k = torch.empty(shape, dtype=decoder.cache_dtype(rows), device=device)
            self.v = torch.empty(shape, dtype=decoder.cache_dtype(rows), device=device)
        self.length = 0  # columns of the cache filled
        self._adapters(stack.slots(adapters))

    def _adapters(self, slots: list[int]) -> None:
        self.slots = slots
        self.one = slots[0] if len(set(slots)) == 1 else None  # every row the same adapter (or none)
        self.masks: dict[str, torch.Tensor] = {}  # per LoRA group, for a batch of mixed adapters
        self.ones: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # per LoRA group, for `one`

    def _lora(
        self, key: str, x: torch.Tensor, out: torch.Tensor, member_slices: dict[str, slice] | None
    ) -> None:
        group: LoraGroup | None = self.stack.groups.get(key)
        if group is None or self.one == -1:
            return
        if self.one is not None:  # two matmuls and one add, whatever the group's members
            one = self.ones.get(key)
            if one is None:
                spans = [member_slices[m] for m in group.members] if member_slices else None
                one = self.ones[key] = group.for_one(self.one, spans, out.shape[-1])
            a, b = one
            out.add_(F.linear(F.linear(x.to(a.dtype), a), b))
            return
        outputs = [out[..., member_slices[m]] if member_slices else out for m in group.members]
        if key not in self.masks:
            self.masks[key] = group.mask(torch.tensor(self.slots))
        group.apply_mixed(x, outputs, self.masks[key])

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run ids [rows, T] at cache columns length..length+T; logits [rows, V] of the last column."""
        d = self.d
        rows, steps = ids.shape
        start, end = self.length, self.length + steps
        cos_table, sin_table = d.rope(int(positions.max()) + 1)
        cos, sin = cos_table[positions][:, :, None], sin_table[positions][:, :, None]
        allowed = self.valid[:, None, None, :end]
        if steps > 1:  # causal within the new columns; a padding column sees itself (no empty rows)
            query = torch.arange(start, end, device=ids.device)[:, None]
            key = torch.arange(end, device=ids.device)[None]
            allowed = (allowed & (key <= query)) | (key == query)
        elif ids.device.type == "cpu":
            allowed = decode_bias(allowed, d.kv_heads)  # once for every layer
        heads, kv_heads, dim = d.heads, d.kv_heads, d.head_dim
        qk_width = (heads + kv_heads) * dim
        x = F.embedding(ids, d.embed)
        for i, layer in enumerate(d.layers):
            h = F.rms_norm(x, (d.hidden,), layer.ln1, d.eps)
            qkv = linear(h, layer.qkv, mv=d.mv)
            self._lora(layer.lora[0], h, qkv, d.slices)
            qk = qkv[..., :qk_width].view(rows, steps, heads + kv_heads, dim)
            qk = qk * cos + qk.view(rows, steps, heads + kv_heads, 2, dim // 2).flip(-2).view_as(qk) * sin
            self.k[i, :, :, start:end] = qk[:, :, heads:].transpose(1, 2)
            self.v[i, :, :, start:end] = qkv[..., qk_width:].view(rows, steps, kv_heads, dim).transpose(1, 2)
            att = attend(
                qk[:, :, :heads].transpose(1, 2), self.k[i, :, :, :end], self.v[i, :, :, :end], allowed
            )
            att = att.transpose(1, 2).reshape(rows, steps, heads * dim)
            o = linear(att, layer.o, mv=d.mv)
            self._lora(layer.lora[1], att, o, None)
            x = x + o
            h = F.rms_norm(x, (d.hidden,), layer.ln2, d.eps)
            gate_up = linear(h, layer.gate_up, mv=d.mv)
            self._lora(layer.lora[2], h, gate_up, d.slices)
            act = F.silu(gate_up[..., : d.intermediate]) * gate_up[..., d.intermediate :]
            down = linear(act, layer.down, mv=d.mv)
            self._lora(layer.lora[3], act, down, None)
            x = x + down
        self.length = end
        return linear(F.rms_norm(x[:, -1], (d.hidden,), d.norm, d.eps), d.lm_head, mv=d.mv)

    def prefill(self) -> torch.Tensor:
        with self.pool.lock, torch.inference_mode():
            return self._forward(self.ids, self.positions)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row [rows, 1]; logits [rows, V] of the next."""
        with self.pool.lock, torch.inference_mode():
            self.valid[:, self.length] = True
            self.positions = self.positions[:, -1:] + 1
            return self._forward(tokens.to(self.valid.device), self.positions)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (finished requests leave the batch and the cache)."""
        with torch.inference_mode():
            rows = rows.to(self.valid.device)
            self.k, self.v = self.k[:, rows], self.v[:, rows]
            self.valid, self.positions = self.valid[rows], self.positions[rows]
            self._adapters([self.slots[r] for r in rows.tolist()])

    def merge(self, other: FastBatch) -> None:
        """Take `other`'s rows in, after this batch's (same decoder and stack): from the next step
        on one forward pass serves both. The shorter cache's columns end where the longer's do,
        its missing ones masked out (attention reads the set of allowed columns; each row keeps
        its own positions), with room for the longer of the two remainders."""
        length = max(self.length, other.length)
        capacity = length + max(b.k.shape[3] - b.length for b in (self, other))
        layers, mine, kv_heads, _, dim = self.k.shape
        rows = mine + other.k.shape[1]
        shape = (layers, rows, kv_heads, capacity, dim)
        dtype = self.d.cache_dtype(rows)
        with torch.inference_mode():
            k, v = (torch.zeros(shape, dtype=dtype, device=self.k.device) for _ in range(2))
            valid = torch.zeros(rows, capacity, dtype=torch.bool, device=self.valid.device)
            for b, at in ((self, slice(0, mine)), (other, slice(mine, rows))):
                cols = slice(length - b.length, length)
                k[:, at, :, cols] = b.k[:, :, :, : b.length]
                v[:, at, :, cols] = b.v[:, :, :, : b.length]
                valid[at, cols] = b.valid[:, : b.length]
            self.k, self.v, self.valid = k, v, valid
            self.positions = torch.cat([self.positions[:, -1:], other.positions[:, -1:]])
        self.length = length
        self._adapters(self.slots + other.slots)


class HFBatch:
    """One decode batch through the Hugging Face model and peft (`ExpertPool.forward`)."""

    def __init__(self, pool: ExpertPool, ids: torch.Tensor, mask: torch.Tensor, adapters: Sequence[str]):
        self.pool, self.ids, self.mask, self.adapters = pool, ids, mask, list(adapters)
        self.positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.cache: Any = None

    def prefill(self) -> torch.Tensor:
        # The last column as an index tensor, not logits_to_keep=1: slicing gives a strided
        # [rows, 1, H] view that torch multiplies by copying the vocab matrix once per row.
        last = torch.tensor([self.ids.shape[1] - 1])
        out = self.pool.forward(self.ids, self.mask, self.adapters, None, self.positions, logits_to_keep=last)
        self.cache = out.past_key_values
        return out.logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, torch.ones((self.mask.shape[0], 1), dtype=self.mask.dtype)], dim=1)
        self.positions = self.positions[:, -1:] + 1
        out = self.pool.forward(
            tokens, self.mask, self.adapters, self.cache, self.positions, logits_to_keep=1
        )
        self.cache = out.past_key_values
        return out.logits[:, -1]

    def select(self, rows: torch.Tensor) -> None:
        with torch.inference_mode():
            self.cache.batch_select_indices(rows.to(self.pool.device))
            self.mask, self.positions = self.mask[rows], self.positions[rows]
            self.adapters = [self.adapters[r] for r in rows.tolist()]

"""Base weights in a CPU kernel's own layout, for serving: oneDNN's blocked bf16, 4 bits, or bf16
storage for an fp32 pool.

Decoding reads every base weight once per step, so how fast a kernel reads them sets batch-1
speed. Three packed formats replace the plain weights of the decoder layers' linears (each
format holds the weights once; the plain copies are freed):

- "onednn": the same bf16 values in oneDNN's blocked layout (`torch.ops.mkldnn._linear_pointwise`,
  as torch.compile's CPU backend uses them): bit-for-bit F.linear's results, and on an AMD EPYC
  faster than F.linear at 1 to 32 rows (docs/benchmarks.md#on-an-amd-epyc-kernels-chosen-by-timing-packed-base-weights-2026-12-01-late). Lossless for any model.
- "int4": torch's 4-bit weight-only matmul (`_weight_int4pack_mm_for_cpu`), one scale and zero per
  group of 32 inputs. The default base ships as a Q4_1 GGUF, so its layers already are `d * q + m`
  per block of 32 (q in 0..15) and packing them loses nothing but the bf16 rounding of d and m
  (perplexity as bf16's, same section). A quarter of the bytes: faster than bf16 at one row, but
  the kernel's cost grows with the rows (slower at 32), so it suits batch-1 latency, not
  throughput. `pack` refuses weights that are not on such a grid.
- "bf16", for an fp32 pool (a CPU without native bf16, where bf16 compute is emulated and slow):
  the weights stored in bf16, half the bytes, computed in fp32. One row goes through ATen's bf16
  GEMV, which widens the weights in registers and accumulates in fp32 (the row is rounded to bf16
  on the way in, as a bf16 pool does); more rows widen CHUNK_ROWS output rows of weights at a time
  to fp32 (they stay in cache) for an fp32 matmul. The same values a bf16 pool serves. Under
  `auto`, the groups also keep a oneDNN-packed fp32 copy (`wide`) for calls of more than one row,
  where it is timed faster here: on an AVX2-only EPYC 1.5-1.7x at 8 and 32 rows, for 1.5x the
  memory of one fp32 model (docs/benchmarks.md#on-a-real-avx2-only-machine). `base_weights=bf16`
  keeps bf16 storage alone (the least memory).

`pack_model(model, "auto", dtype, cpu)` tries the format `auto_format` names for the pool's dtype
on this CPU (oneDNN for a bf16 pool on a CPU with native bf16, bf16 storage for an fp32 pool on
one without) and installs it only where one row through it beats the plain weights, timed here.

The linears that read one input (a layer's q/k/v, its gate/up) are packed as one (`PackedLinear`),
so the lean decoder runs them in one matmul; each Hugging Face module gets a forward that runs its
group and keeps its own rows (the fallback path; nothing is stored twice). A packed module's
`weight` is no parameter but the group's packed tensor (also its `qweight`, as peft names quantized
weights), which only says where the weights are: anything that computes with it fails loudly (an
opaque oneDNN tensor, or uint8), rather than silently with wrong numbers.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from experts.hardware import CpuInfo, cpu_info
from serving.engine.layout import group_key, in_order

log = logging.getLogger(__name__)

Kind = Literal["onednn", "int4", "bf16"]
GROUP = 32  # int4: inputs per scale and zero (Q4_1's block)
WIDE_ROWS = 8  # bf16 storage's fp32 copy: oneDNN's layout for this many rows, and the rows it is timed at
# bf16 storage, several rows: output rows of weights widened to fp32 per matmul. 512 x 576 fp32 is
# 1.2 MB, in cache; a whole lm_head widened at once was slower (docs/benchmarks.md#on-a-cpu-without-native-bf16-avx2-imitated-bf16-storage-fp32-compute-2026-12-02).
CHUNK_ROWS = 512


@dataclass(frozen=True, eq=False)
class PackedLinear:
    """One or more bias-free linears' weights [out, in], packed as one."""

    kind: Kind
    weight: torch.Tensor  # onednn: opaque bf16 [out, in]; int4: [out, in / 2] uint8; bf16: [out, in]
    scales: torch.Tensor | None  # int4: [in / GROUP, out, 2] bf16 (scale, zero), contiguous
    in_features: int
    out_features: int
    wide: torch.Tensor | None = None  # bf16: an opaque oneDNN-packed fp32 copy for > 1 row (`with_wide`)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in x's dtype (bf16 for a bf16 pool, fp32 for an fp32 one)."""
        if self.kind == "bf16":
            if self.wide is None or x.numel() == x.shape[-1]:
                return bf16_linear(x, self.weight)
            flat = x.reshape(-1, self.in_features)
            y = torch.ops.mkldnn._linear_pointwise(flat, self.wide, None, "none", [], "")
            return y.view(*x.shape[:-1], self.out_features)
        dtype = x.dtype
        x = x.to(torch.bfloat16)  # the kernels take bf16 rows (int4 ones with fp32 rows: far slower)
        if self.kind == "onednn":
            y = torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")
        else:
            flat = x.reshape(-1, self.in_features)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, GROUP, self.scales)
            y = y.view(*x.shape[:-1], self.out_features)
        return y.to(dtype)

    def row_bytes(self) -> int:
        """Bytes one row reads: the weights and scales of its kernel (not the fp32 copy)."""
        scales = 0 if self.scales is None else self.scales.numel() * self.scales.element_size()
        return self.weight.numel() * self.weight.element_size() + scales

    def nbytes(self) -> int:
        """Bytes held: `row_bytes` and the fp32 copy, if any."""
        return self.row_bytes() + (0 if self.wide is None else 4 * self.in_features * self.out_features)


def with_wide(group: PackedLinear) -> PackedLinear:
    """A bf16-stored group that also holds its weights as oneDNN-packed fp32 for calls of more
    than one row (the same values: bf16 fits in fp32)."""
    wide = torch.ops.mkldnn._reorder_linear_weight(group.weight.float(), WIDE_ROWS)
    return dataclasses.replace(group, wide=wide)


def wide_is_faster(packs: Sequence[PackedLinear | None], wide: Sequence[PackedLinear | None]) -> bool:
    """Whether WIDE_ROWS rows through the fp32 copies beat bf16 storage's widening, timed here."""
    rows = {p.in_features: torch.randn(WIDE_ROWS, p.in_features) for p in packs if p is not None}

    def run(groups: Sequence[PackedLinear | None]) -> Callable[[], object]:
        return lambda: [g(rows[g.in_features]) for g in groups if g is not None]

    return fastest({"bf16": run(packs), "fp32 copy": run(wide)}) == "fp32 copy"


def bf16_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] (fp32) times bf16 weights [out, in], computed in fp32: [..., out] fp32."""
    if x.numel() == x.shape[-1]:  # one row: ATen's bf16 GEMV (fp32 accumulation)
        y = torch.mv(weight, x.reshape(-1).to(torch.bfloat16)).float()
        return y.view(*x.shape[:-1], -1)
    parts = [
        F.linear(x, weight[at : at + CHUNK_ROWS].float()) for at in range(0, weight.shape[0], CHUNK_ROWS)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """w [out, in] fp32 as (packed, scales), or None when its values are not, per group of GROUP
    inputs, the group's min plus 0..15 equal steps (to float rounding)."""
    rows, features = w.shape
    g = w.view(rows, features // GROUP, GROUP)
    low, high = g.amin(-1), g.amax(-1)
    step = (high - low) / 15
    q = torch.round((g - low[..., None]) / torch.where(step > 0, step, 1)[..., None]).clamp(0, 15)
    if (q * step[..., None] + low[..., None] - g).abs().amax() > 1e-5 * float(g.abs().amax()):
        return None
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).view(rows, features), 8)
    # the kernel computes (q - 8) * scale + zero
    return packed, torch.stack([step.t(), (low + 8 * step).t()], dim=-1).to(torch.bfloat16).contiguous()


def pack(weights: Sequence[torch.Tensor], kind: str) -> PackedLinear | None:
    """Weights [out_i, in] of linears that read one input, packed as one; None where `kind`
    cannot hold them (int4: rows not a multiple of 16, inputs not of GROUP, or not on a 4-bit grid)."""
    rows, features = sum(int(w.shape[0]) for w in weights), int(weights[0].shape[1])
    if kind == "bf16":
        stored = torch.cat([w.detach().to(torch.bfloat16) for w in weights])
        return PackedLinear("bf16", stored, None, features, rows)
    w = torch.cat([w.detach().float() for w in weights])
    if kind == "onednn":
        packed = torch.ops.mkldnn._reorder_linear_weight(w.to(torch.bfloat16), None)
        return PackedLinear("onednn", packed, None, features, rows)
    if kind != "int4":
        raise ValueError(f"unknown packed format {kind!r} (onednn, int4 or bf16)")
    if rows % 16 or features % GROUP:
        return None
    int4 = _int4(w)
    return None if int4 is None else PackedLinear("int4", int4[0], int4[1], features, rows)


def is_adapter_module(path: str) -> bool:
    """Whether the module at this path is one of an adapter's own (peft's lora_A/B, modules_to_save)."""
    return any(part.startswith("lora_") or part == "modules_to_save" for part in path.split("."))


def sibling_groups(model: Any) -> list[list[torch.nn.Linear]]:
    """The decoder layers' bias-free linears (inside peft's wrappers too), siblings together
    in their order; the embeddings and the LM head are not in any."""
    groups: dict[str, dict[str, torch.nn.Linear]] = {}
    for path, module in model.named_modules():
        if type(module) is not torch.nn.Linear or ".layers." not in f".{path}" or module.bias is not None:
            continue
        if "weight" not in module._parameters:  # packed already
            continue
        if is_adapter_module(path):
            continue  # the LoRA stack holds them, fp32
        parent, _, leaf = path.rpartition(".")
        if leaf == "base_layer":  # inside peft's wrapper, which bears the module's name
            parent, _, leaf = parent.rpartition(".")
        groups.setdefault(group_key(parent, leaf), {})[leaf] = module
    return [[members[m] for m in in_order(members)] for members in groups.values()]


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    group, rows = self.__dict__["packed"]
    return group(x)[..., rows]


def install(linears: Sequence[torch.nn.Linear], group: PackedLinear) -> None:
    """Make these modules (group's rows, in order) compute from `group` and drop their own weights."""
    at = 0
    for m in linears:
        rows = slice(at, at + m.out_features)
        at = rows.stop
        del m.weight  # the parameter; what is left in its place only says where the weights are:
        vars(m).update(weight=group.weight, qweight=group.weight)  # peft reads their device (and type)
        vars(m).update(packed=(group, rows), forward=types.MethodType(_forward, m))


def auto_format(dtype: torch.dtype, cpu: CpuInfo | None = None) -> Kind | None:
    """The packed format `base_weights=auto` tries for a CPU pool of `dtype` on this CPU (None:
    keep the plain weights): oneDNN's bf16 layout for a bf16 pool where the CPU has native bf16;
    bf16 storage with fp32 compute for an fp32 pool where it has not (on one that has, an fp32
    pool was asked for by `precision=fp32`: kept as asked)."""
    native = (cpu or cpu_info()).native_bf16
    if dtype == torch.bfloat16:
        return "onednn" if native and torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    return "bf16" if dtype == torch.float32 and not native else None


def pack_model(model: Any, kind: str, dtype: torch.dtype = torch.bfloat16, cpu: CpuInfo | None = None) -> int:
    """Pack every sibling group of the decoder layers that `kind` can hold, for a pool computing
    in `dtype`; the linears packed. "auto": `auto_format`'s, installed only where one row through
    the packed groups beats both plain paths here (`packed_is_faster`); the groups are packed
    once, for the timing and for serving. Bf16 storage under "auto" also keeps an fp32 copy for
    batches (`with_wide`) where WIDE_ROWS rows through it are timed faster (`wide_is_faster`)."""
    groups = sibling_groups(model)
    fmt = auto_format(dtype, cpu) if kind == "auto" else kind
    if fmt is None or not groups:
        return 0
    with torch.no_grad():
        packs = [pack([m.weight for m in g], fmt) for g in groups]
    if kind == "auto" and not packed_is_faster(groups, packs, dtype):
        return 0
    if kind == "auto" and fmt == "bf16" and torch.backends.mkldnn.is_available():
        wide = [None if p is None else with_wide(p) for p in packs]
        if wide_is_faster(packs, wide):
            packs, fmt = wide, "bf16, fp32 copy for batches"
    count = 0
    for linears, group in zip(groups, packs, strict=True):
        if group is not None:
            install(linears, group)
            count += len(linears)
    log.info("base weights: %d linears packed (%s)", count, fmt)
    return count


def fastest(candidates: dict[str, Callable[[], object]], rounds: int = 3) -> str:
    """The name of the quickest of these calls, timed here: rounds alternate them after a
    warm-up round, the median decides (the machine may be busy)."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.inference_mode():
        for _ in range(rounds + 1):
            for name, call in candidates.items():
                t0 = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(t[1:]) for name, t in times.items()}
    log.info("timed: %s", ", ".join(f"{name} {1000 * s:.1f} ms" for name, s in medians.items()))
    return min(medians, key=medians.__getitem__)


def packed_is_faster(
    groups: Sequence[Sequence[torch.nn.Linear]],
    packs: Sequence[PackedLinear | None],
    dtype: torch.dtype = torch.bfloat16,
) -> bool:
    """Whether one row through these packed groups beats both plain single-row paths (`torch.mv`,
    F.linear) over the same weights in the pool's `dtype` (copies, dropped after), timed here:
    which wins depends on the CPU."""
    with torch.no_grad():
        fused = [torch.cat([m.weight.detach() for m in g]).to(dtype) for g in groups]
    rows = {w.shape[1]: torch.randn(1, w.shape[1]).to(dtype) for w in fused}
    candidates: dict[str, Callable[[], object]] = {
        "packed": lambda: [p(rows[p.in_features]) for p in packs if p is not None],
        "mv": lambda: [torch.mv(w, rows[w.shape[1]][0]) for w in fused],
        "linear": lambda: [F.linear(rows[w.shape[1]], w) for w in fused],
    }
    return fastest(candidates) == "packed"


def packed_group(modules: Sequence[Any]) -> PackedLinear | None:
    """The group these (HF or peft-wrapped) modules were packed as, all of it in this order; else None."""
    found = [vars(getattr(m, "base_layer", m)).get("packed") for m in modules]
    info: list[tuple[PackedLinear, slice]] = [i for i in found if i is not None]
    if not info or len(info) < len(found):
        return None
    group = info[0][0]
    at = 0
    for g, rows in info:
        if g is not group or rows.start != at:
            return None
        at = rows.stop
    return group if at == group.out_features else None


def packed_groups(model: Any) -> list[PackedLinear]:
    """Every group the model's linears were packed as (each once)."""
    found: dict[int, PackedLinear] = {}
    for module in model.modules():
        info = module.__dict__.get("packed")  # not through peft's wrappers, which forward attributes
        if info is not None:
            found.setdefault(id(info[0]), info[0])
    return list(found.values())


def layout(model: Any) -> str:
    """How the model's decoder layers hold their base weights: "onednn", "int4", "bf16" or "plain"."""
    kinds = sorted({g.kind for g in packed_groups(model)})
    return "+".join(kinds) if kinds else "plain"

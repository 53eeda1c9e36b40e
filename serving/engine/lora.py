"""Every loaded adapter's LoRA stacked per module group (punica / S-LoRA style), for the lean forward.

A serving forward computes the LoRA of a batch mixing any number of adapters in a fixed number of
matmuls per module instead of peft's gather / matmul / scatter per adapter. `prepare.lora_stack`
builds it (and rebuilds it whenever the pool's adapters change); peft's `adapter_names` forward,
which computes with views into the very same weights, is the reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from experts.adapters import BASE, PEFT_BASE
from serving.engine.layout import group_key, in_order


@dataclass(frozen=True)
class LoraGroup:
    """The LoRA of the modules that read one input (a layer's q/k/v, its gate/up, or one module
    alone), every adapter stacked: slot s holds `LoraStack.names[s]`."""

    members: tuple[str, ...]  # module names, e.g. ("q_proj", "k_proj", "v_proj")
    ranks: tuple[int, ...]  # per member: the largest rank over the adapters (zero rows pad smaller ones)
    a: torch.Tensor  # [slots, R, in], R = sum(ranks): the members' A of one adapter, one after the other
    b: tuple[torch.Tensor, ...]  # per member [out, slots * rank]: slot s owns columns s*rank .. (s+1)*rank
    scale: torch.Tensor  # [slots, R]: lora_alpha / r of the adapter, for the member each row of `a` feeds

    def mask(self, slots: torch.Tensor) -> torch.Tensor:
        """[rows, slots, R]: each row's own adapter's scaling, zero for the others (slot -1: no adapter)."""
        own = slots.to(self.a.device)[:, None] == torch.arange(self.a.shape[0], device=self.a.device)
        return own.to(self.scale.dtype)[:, :, None] * self.scale

    def for_one(
        self, slot: int, spans: Sequence[slice] | None, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter `slot` alone, for rows that all use it, as (A [R, in] with the scaling folded
        in, B [width, R]): B writes each member's span (`spans`, in member order; None: the whole
        output) of an output `width` wide and zero elsewhere, so the group's LoRA of x is
        x A^T B^T, two matmuls whatever its members (one adapter's copy: small, made per batch)."""
        a = self.a[slot] * self.scale[slot][:, None]
        b = torch.zeros(width, a.shape[0], dtype=a.dtype, device=a.device)
        at = 0
        for i, (rank, stacked) in enumerate(zip(self.ranks, self.b, strict=True)):
            rows = spans[i] if spans is not None else slice(None)
            b[rows, at : at + rank] = stacked[:, slot * rank : (slot + 1) * rank]
            at += rank
        return a, b

    def apply_mixed(self, x: torch.Tensor, outputs: Sequence[torch.Tensor], mask: torch.Tensor) -> None:
        """Rows with different adapters (`mask` from `mask(slots)`): one matmul against every
        adapter's A, the mask keeps each row's own (scaled), one matmul per member against every B.
        On a CPU this beats both a gathered per-row bmm and a loop over adapters (docs/benchmarks.md)."""
        rows, steps = x.shape[:2]
        slots, total = self.scale.shape
        h = F.linear(x.to(self.a.dtype), self.a.view(slots * total, -1)).view(rows, steps, slots, total)
        h = h * mask[:, None]
        at = 0
        for rank, b, out in zip(self.ranks, self.b, outputs, strict=True):
            out.add_(F.linear(h[..., at : at + rank].reshape(rows, steps, slots * rank), b))
            at += rank


@dataclass(frozen=True)
class LoraStack:
    """Every loaded adapter's LoRA weights, stacked per module group (rebuilt on add/remove).

    The stack owns the weights: peft's LoRA modules are left holding views into it, so nothing is
    stored twice and peft's own forward (the reference) computes with the very same numbers.
    """

    names: tuple[str, ...]  # slot -> adapter name
    groups: dict[str, LoraGroup]  # "<parent module>.<qkv | gate_up | module name>" -> its group

    def slots(self, adapters: Sequence[str]) -> list[int]:
        """Slot of each row's adapter; -1 for the base model."""
        index = {name: slot for slot, name in enumerate(self.names)}
        return [-1 if a in (BASE, PEFT_BASE) else index[a] for a in adapters]

    @classmethod
    def build(
        cls, model: Any, adapters: Mapping[str, str], dtype: torch.dtype = torch.float32
    ) -> LoraStack | None:
        """Stack a peft model's adapters (expert -> peft adapter name); None when one cannot be
        stacked (a LoRA variant, a LoRA bias, LoRA on a non-linear module): peft serves."""
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.lora.layer import LoraLayer

        loaded = set(adapters.values())
        modules: dict[str, dict[str, Any]] = {}
        for path, module in model.get_base_model().named_modules():
            if not isinstance(module, LoraLayer):
                continue
            names = loaded & {*module.lora_A, *module.lora_embedding_A}
            if not names:  # peft keeps the wrapper of a module whose adapters were all removed
                continue
            if not isinstance(module, LoraLinear) or module.fan_in_fan_out:
                return None
            if any(n in module.lora_variant or module.lora_bias.get(n, False) for n in names):
                return None
            parent, _, leaf = path.rpartition(".")
            modules.setdefault(group_key(parent, leaf), {})[leaf] = module
        groups = {}
        with torch.no_grad():
            for key, members in modules.items():
                group = _stack_group(members, list(adapters.values()), dtype)
                if group is not None:
                    groups[key] = group
        return cls(tuple(adapters), groups)


def _stack_group(members: dict[str, Any], names: Sequence[str], dtype: torch.dtype) -> LoraGroup | None:
    order = in_order(members)
    ranks = {m: max((members[m].r[n] for n in names if n in members[m].lora_A), default=0) for m in order}
    order = [m for m in order if ranks[m] > 0]  # a module no loaded adapter targets
    if not order:
        return None
    first = members[order[0]]
    device = first.base_layer.weight.device
    total = sum(ranks[m] for m in order)
    a = torch.zeros(len(names), total, first.in_features, dtype=dtype, device=device)
    scale = torch.zeros(len(names), total, dtype=dtype, device=device)
    bs = {
        m: torch.zeros(members[m].out_features, len(names) * ranks[m], dtype=dtype, device=device)
        for m in order
    }
    for slot, name in enumerate(names):
        at = 0
        for m in order:
            module, rank = members[m], ranks[m]
            if name in module.lora_A:
                lora_a, lora_b = module.lora_A[name].weight, module.lora_B[name].weight
                r = lora_a.shape[0]
                a[slot, at : at + r] = lora_a
                bs[m][:, slot * rank : slot * rank + r] = lora_b
                scale[slot, at : at + rank] = module.scaling[name]
                # peft keeps views into the stack: one copy of the weights, the same numbers
                lora_a.data = a[slot, at : at + r]
                lora_b.data = bs[m][:, slot * rank : slot * rank + r]
            at += rank
    return LoraGroup(tuple(order), tuple(ranks[m] for m in order), a, tuple(bs[m] for m in order), scale)

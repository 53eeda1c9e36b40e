"""Preparing the pool's model for serving: every in-place rewrite of the model happens here.

- `serving_weights`: base weights cast to the compute dtype, packed into a CPU kernel's layout
  (`packed`), single-row linears routed through `torch.mv` where that is faster here;
- `decoder_for`: the lean decoder's arrangement of those weights (q/k/v and gate/up fused, the
  HF modules left holding views), built on first use after the last `serving_weights`;
- `lora_stack`: every adapter's LoRA stacked (`lora`; peft left holding views), rebuilt after the
  pool's adapters changed (`ExpertPool.revision`).
Nothing else rewrites the model, so what these built stays valid until they rebuild it.
"""

from __future__ import annotations

import logging
import types
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from experts.adapters import ExpertPool
from experts.config import AppConfig, ResourceSpec
from experts.hardware import CpuInfo
from serving.engine.decoder import Decoder, fast_path_problem, linear, prefers_mv
from serving.engine.lora import LoraStack
from serving.engine.packed import is_adapter_module, layout, pack_model

log = logging.getLogger(__name__)


@dataclass
class _Prepared:
    """What was built over one pool's model: the lean decoder, the LoRA stack."""

    decoder: Decoder | None = None
    decoder_built: bool = False  # False: (re)build on next use (`serving_weights` rewrote the weights)
    stack: LoraStack | None = None
    stack_revision: int = -1  # the pool's `revision` the stack was built at


_PREPARED: weakref.WeakKeyDictionary[ExpertPool, _Prepared] = weakref.WeakKeyDictionary()


def _prepared(pool: ExpertPool) -> _Prepared:
    state = _PREPARED.get(pool)
    if state is None:
        state = _PREPARED[pool] = _Prepared()
    return state


def decoder_for(pool: ExpertPool) -> Decoder | None:
    """The pool's fast decoder (built on first use), or None when the fast path cannot serve it."""
    state = _prepared(pool)
    if not state.decoder_built:
        with pool.lock:
            model = pool.model.get_base_model() if hasattr(pool.model, "peft_config") else pool.model
            state.decoder = Decoder(model) if fast_path_problem(model) is None else None
            state.decoder_built = True
    return state.decoder


def lora_stack(pool: ExpertPool) -> LoraStack | None:
    """Every adapter of the pool stacked (fp32: small, and small fp32 matmuls are the fast ones on
    a CPU), rebuilt once the adapters changed; None when one cannot be stacked (a LoRA variant, a
    LoRA bias, LoRA on a non-linear module), and then peft computes the LoRA."""
    state = _prepared(pool)
    if state.stack_revision != pool.revision:
        # Plain tensors even when asked from a decoding step: peft's LoRA weights become views
        # into the stack, and peft sets requires_grad on them when it loads the next adapter.
        with pool.lock, torch.inference_mode(False):
            state.stack = LoraStack.build(pool.model, pool.peft_names) if pool.adapters else LoraStack((), {})
            state.stack_revision = pool.revision
        if state.stack is None:
            log.warning("an adapter cannot be stacked (LoRA variant, bias or non-linear module): peft serves")
    return state.stack


def _linear_gemv(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


def use_gemv(model: torch.nn.Module) -> bool:
    """Single-row linears on the CPU through `torch.mv` where that reads this model's weights
    faster than F.linear's single-row path (`decoder.prefers_mv`: it depends on the CPU;
    batch-1 decoding is all single rows). Returns whether it did."""
    linears = [  # the base model's (an adapter's own LoRA linears are small, and fp32)
        m
        for path, m in model.named_modules()
        if type(m) is torch.nn.Linear and "forward" not in m.__dict__ and not is_adapter_module(path)
    ]
    if not prefers_mv([m.weight for m in linears]):
        return False
    for module in linears:
        module.forward = types.MethodType(_linear_gemv, module)  # type: ignore[method-assign]
    return True


def serving_weights(pool: ExpertPool, base_weights: str = "auto", cpu: CpuInfo | None = None) -> None:
    """Base weights in the pool's compute dtype: decoding reads every weight once per step, so half
    the bytes in bf16 (autocast alone would keep fp32 weights and cast them at every step). The
    LoRA stack stays fp32: it is small, and small fp32 matmuls are the fast ones on a CPU.

    base_weights, for a pool on the CPU (`packed`): "onednn" holds the decoder layers'
    linears of a bf16 pool in oneDNN's blocked bf16 layout (the same values); "int4" at 4 bits
    where that is lossless (a base converted from a 4-bit GGUF, as the default is); "bf16" stores
    an fp32 pool's in bf16 and computes in fp32 (a CPU without native bf16: half the bytes a
    token); "plain" keeps them as they are; "auto" tries the format `packed.auto_format`
    names for the pool's dtype on this CPU (`cpu`, default this machine's) and keeps it where one
    row through it is faster than through the plain weights here."""
    allowed = {torch.bfloat16: ("auto", "onednn", "int4"), torch.float32: ("auto", "bf16", "int4")}
    with pool.lock:
        _prepared(pool).decoder_built = False  # the weights it arranged are rewritten below
        if pool.device == "cpu" and base_weights in allowed.get(pool.dtype, ()):
            packed = pack_model(pool.model, base_weights, pool.dtype, cpu)  # from the fp32 weights
            if base_weights == "int4" and not packed:
                log.warning(
                    "base_weights=int4: no layer's weights are on a 4-bit grid (not a 4-bit GGUF?): kept plain"
                )
        elif base_weights not in ("auto", "plain"):
            log.warning(
                "base_weights=%s does not fit a %s pool on %s: kept plain",
                base_weights,
                str(pool.dtype).removeprefix("torch."),
                pool.device,
            )
        if pool.dtype == torch.float32:
            return
        for name, param in pool.model.named_parameters():
            if "lora_" not in name and param.dtype != pool.dtype:
                param.data = param.data.to(pool.dtype)
        if pool.device == "cpu":
            use_gemv(pool.model)  # the HF path's single rows


def load_pool(app: AppConfig, names: Sequence[str], res: ResourceSpec) -> ExpertPool:
    """The serving pool: threads set, base weights in the compute dtype and `res.base_weights`."""
    torch.set_num_threads(res.torch_threads)  # replicas share cores; oversubscribed threads fight
    pool = ExpertPool.load(app, list(names), strict=False)
    serving_weights(pool, res.base_weights)  # adapters loaded later wrap these same base weights
    return pool


def pool_info(pool: ExpertPool) -> dict[str, Any]:
    """What a pool serves and how: its experts, those that failed to load, device, dtype, layout."""
    return {
        "experts": list(pool.adapters),
        "failed": dict(pool.failed),
        "device": pool.device,
        "dtype": str(pool.dtype).removeprefix("torch."),
        "base_weights": layout(pool.model),
    }

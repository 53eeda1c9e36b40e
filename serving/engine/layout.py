"""The one table of a Llama-family decoder layer's linears, as the engine groups them.

Linears that read the same input (a layer's q/k/v, its gate/up) are one group: packed as one
weight (`packed`), stacked as one LoRA A (`lora`), multiplied as one matmul (`decoder`).
"""

from __future__ import annotations

from collections.abc import Iterable

# Module name -> the group it belongs to (a module not named here is a group of its own)
SIBLINGS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
# The order of a group's members: their rows, one after the other, in the fused weight
MEMBER_ORDER = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
# A decoder layer's four groups, as the lean forward runs them
LAYER_GROUPS = ("self_attn.qkv", "self_attn.o_proj", "mlp.gate_up", "mlp.down_proj")


def layer_lora_keys(layer: int) -> tuple[str, str, str, str]:
    """The LoRA group keys of decoder layer `layer`, in LAYER_GROUPS order."""
    qkv, o, gate_up, down = (f"model.layers.{layer}.{group}" for group in LAYER_GROUPS)
    return qkv, o, gate_up, down


def group_key(parent: str, leaf: str) -> str:
    """The group of module `leaf` under `parent`: e.g. "model.layers.0.self_attn.qkv"."""
    return f"{parent}.{SIBLINGS.get(leaf, leaf)}"


def in_order(members: Iterable[str]) -> list[str]:
    """A group's member names in their fused order."""
    return sorted(members, key=lambda m: MEMBER_ORDER.index(m) if m in MEMBER_ORDER else 0)

"""What training writes: resumable checkpoints, the adapter with its config, metrics and model card,
and the base model's cached held-out perplexity.

Checkpoints are safetensors + JSON only: nothing a user hands us is unpickled. Final files are staged
and moved into place, the adapter last, so a reader never sees a half-written expert.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from experts.atomic import replace_dir, write_text
from experts.config import AppConfig, ExpertSpec


def save_checkpoint(ckpt: Path, model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    tensors, groups = {}, []
    for i, (pid, pstate) in enumerate(optimizer.state_dict()["state"].items()):
        for key, value in pstate.items():
            tensors[f"{pid}.{key}"] = (
                value.detach().contiguous().clone() if torch.is_tensor(value) else torch.tensor(value)
            )
        assert i == pid
    for group in optimizer.state_dict()["param_groups"]:
        groups.append({k: v for k, v in group.items() if isinstance(v, int | float | bool | list)})
    with replace_dir(ckpt) as staged:
        model.save_pretrained(staged)
        save_file(tensors, str(staged / "optimizer.safetensors"))
        (staged / "state.json").write_text(json.dumps({**state, "param_groups": groups}, indent=1))


def load_checkpoint(ckpt: Path, model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from peft import set_peft_model_state_dict

    state = json.loads((ckpt / "state.json").read_text())
    set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = value
    sd = optimizer.state_dict()
    sd["state"] = opt_state
    for group, saved in zip(sd["param_groups"], state.pop("param_groups"), strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})
    optimizer.load_state_dict(sd)
    return state


def base_key(app: AppConfig, blocks: torch.Tensor, dtype: torch.dtype) -> str:
    """What the base model's perplexity on `blocks` depends on: the model, the tokens, the precision."""
    payload = json.dumps(
        [dataclasses.asdict(app.base_model), str(dtype), app.train.batch_size, list(blocks.shape)],
        sort_keys=True,
        default=str,
    ).encode()
    return hashlib.sha256(payload + blocks.numpy().tobytes()).hexdigest()[:20]


def _base_cache(app: AppConfig, key: str) -> Path:
    return app.paths.artifacts_dir / "cache" / "base_perplexity" / f"{key}.json"


def cached_base_perplexity(app: AppConfig, key: str) -> float | None:
    try:
        return float(json.loads(_base_cache(app, key).read_text())["perplexity"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or unreadable: compute it again


def save_base_perplexity(app: AppConfig, key: str, value: float) -> None:
    # parallel trainers (Ray) may write the same key: last one wins, with the same value
    write_text(_base_cache(app, key), json.dumps({"perplexity": value}))


def _config_record(app: AppConfig, spec: ExpertSpec) -> dict[str, Any]:
    return {
        "expert": dataclasses.asdict(spec),
        "base_model": dataclasses.asdict(app.base_model),
        "lora": dataclasses.asdict(app.lora),
        "train": dataclasses.asdict(app.train),
    }


def write_outputs(
    app: AppConfig, spec: ExpertSpec, model: Any, out_dir: Path, metrics: dict[str, Any]
) -> None:
    """Adapter + config + metrics + card, written beside each other; the adapter files land last."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staged = out_dir / "adapter.part"
    shutil.rmtree(staged, ignore_errors=True)
    model.save_pretrained(staged, safe_serialization=True)
    (out_dir / "config.json").write_text(json.dumps(_config_record(app, spec), indent=1, default=str))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out_dir / "README.md").write_text(model_card(app, spec, metrics))
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        os.replace(staged / file, out_dir / file)
    shutil.rmtree(staged, ignore_errors=True)


def model_card(app: AppConfig, spec: ExpertSpec, metrics: dict[str, Any]) -> str:
    """A model card for the adapter: what it is, what it was trained on, how well it does."""
    t, lcfg, d = app.train, app.lora, spec.data
    packages = ", ".join(p.pin for p in d.packages) or (d.path or d.hf_id or d.source)
    tp = metrics["test_perplexity"]
    return f"""---
library_name: peft
base_model: {app.base_model.hub_id or app.base_model.name}
tags: [lora, moe-experts, {spec.name}]
---
# Expert `{spec.name}`

{spec.description}

LoRA adapter for **{app.base_model.name}** (base model source: {app.base_model.source}
{app.base_model.package.pin if app.base_model.package else app.base_model.path or app.base_model.hub_id or ""}).

## Training data
- Source: `{d.source}` ({packages})
- Licence of the data: {d.licence}
- Blocks per source: {metrics["train_blocks"]}

## Training
LoRA r={lcfg.r}, alpha={lcfg.alpha}, dropout={lcfg.dropout}, target modules {list(lcfg.target_modules)};
profile `{t.profile}`: {metrics["steps"]} steps of {t.batch_size}x{t.seq_len} tokens (grad accum {t.grad_accum}),
lr {t.lr} ({t.schedule}, {t.warmup_steps} warm-up), seed {t.seed}, {metrics["dtype"]} on {metrics["device"]},
{metrics["seconds"]} s ({metrics["seconds_per_step"]} s/step).

## Evaluation (held-out test split of its own domain, {metrics["test_tokens"]} tokens)
| model | perplexity |
|---|---|
| base | {tp["base"]} |
| this expert | {tp["expert"]} |

Ratio expert/base: {metrics["test_ratio"]}. Best validation perplexity: {metrics["best_val_perplexity"]}.
Cross-domain results: `moe eval` (artifacts/reports/eval.md).

## Intended use and limitations
A small specialist for questions about: {spec.description} It is a 135M-parameter model: fluent but
often wrong on facts; use retrieval grounding and human review for anything that matters (medical,
legal). It inherits the base model's limitations and the biases of its corpus.
"""

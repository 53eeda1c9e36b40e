"""LoRA fine-tuning of one expert on its corpus, with validation, early stopping and resume.

`moe train expert=<slug>` writes artifacts/experts/<slug>/: the adapter in the standard PEFT layout
(adapter_model.safetensors + adapter_config.json, loadable by other LoRA servers), the resolved
config, metrics.json (loss curves, held-out perplexity of base and expert) and a model card.
In a sweep (-m) each trial writes into its own trial directory instead.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from experts.base_model import load_base_model, load_tokenizer, pick_device, pick_dtype
from experts.config import AppConfig, ExpertSpec
from experts.errors import MoeError
from experts.evaluate import block_nll, perplexity
from experts.train_data import build_train_data, feedback_instructions
from experts.train_outputs import (
    base_key,
    cached_base_perplexity,
    load_checkpoint,
    save_base_perplexity,
    save_checkpoint,
    write_outputs,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """The learning-rate multiplier at `step` of `total` (transformers' cosine/linear/constant
    schedules). `total` may change while training runs: a time budget re-plans it every step."""
    if schedule == "constant":
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def steps_that_fit(step: int, done_this_run: int, elapsed: float, budget_s: float, steps: int) -> int:
    """The last step a time budget allows: steps done so far plus as many more as fit in what is
    left, at this run's mean seconds per step so far (validation included); never below `step`."""
    per_step = elapsed / max(1, done_this_run)
    more = math.floor((budget_s - elapsed) / per_step) if per_step > 0 else steps
    return max(step, min(steps, step + more))


def train_expert(
    app: AppConfig,
    spec: ExpertSpec,
    out_dir: Path,
    progress: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Train `spec`'s adapter into `out_dir` and return its metrics (also written to metrics.json).

    With `train.max_minutes` the training loop (validation included) stops before a step that would
    not fit in the budget, with the learning-rate schedule re-planned to end there; `clock` is
    injectable so tests can make the budget deterministic.
    """
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    t, lcfg = app.train, app.lora
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    device = pick_device(t.device)
    dtype = pick_dtype(t.precision, device)
    tokenizer = load_tokenizer(app.base_model, app.paths)
    data = build_train_data(app, spec, tokenizer, feedback_instructions(app, spec))
    model = load_base_model(app.base_model, app.paths, device)
    lora = LoraConfig(
        r=lcfg.r,
        lora_alpha=lcfg.alpha,
        lora_dropout=lcfg.dropout,
        target_modules=list(lcfg.target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        raise MoeError(
            f"lora.target_modules {list(lcfg.target_modules)} do not fit this base model: {exc}"
        ) from exc
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    plan = [t.steps]  # the step training ends at; a time budget lowers it as it measures steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        # warm-up is at most a quarter of the plan: a budget that allows 4 steps must not spend them at lr ~0
        optimizer,
        lambda s: lr_factor(s, plan[0], min(t.warmup_steps, plan[0] // 4), t.schedule),
    )
    autocast = torch.autocast(
        device_type="cuda" if device == "cuda" else "cpu", dtype=dtype, enabled=dtype != torch.float32
    )

    def evaluate(blocks: torch.Tensor, adapter: bool = True, bar: Any = None) -> float:
        model.eval()

        def fwd(ids: torch.Tensor, mask: torch.Tensor, rows: slice) -> torch.Tensor:
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            if bar is not None:
                bar.update(1)
            return logits

        with torch.inference_mode(), autocast:
            if adapter:
                nll = block_nll(fwd, blocks, t.batch_size)
            else:
                with model.disable_adapter():
                    nll = block_nll(fwd, blocks, t.batch_size)
        model.train()
        return perplexity(nll)

    ckpt = out_dir / "checkpoint"
    history: dict[str, Any] = {"train_loss": [], "val": []}
    step, best, bad_evals, resumed = 0, math.inf, 0, None
    if (ckpt / "state.json").exists():
        state = load_checkpoint(ckpt, model, optimizer)
        step, best, bad_evals, history = state["step"], state["best"], state["bad_evals"], state["history"]
        resumed = step
        with warnings.catch_warnings():  # fast-forwarding the schedule warns about step order
            warnings.simplefilter("ignore")
            for _ in range(step):
                scheduler.step()
        log.info("resuming %s from step %d (checkpoint %s)", spec.name, step, ckpt)
    best_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    if resumed and (ckpt / "best.safetensors").exists():
        best_state = load_file(str(ckpt / "best.safetensors"))

    n = len(data.input_ids)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(t.seed))
    per_step = t.batch_size * t.grad_accum
    model.train()
    start, first_step = clock(), step
    budget_s = None if t.max_minutes is None else t.max_minutes * 60
    bar = tqdm(total=t.steps, initial=step, desc=f"train {spec.name}", disable=not progress, unit="step")
    stopped_early = False
    while step < plan[0]:
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for micro in range(t.grad_accum):
            base = (step * per_step + micro * t.batch_size) % n
            idx = order[torch.arange(base, base + t.batch_size) % n]
            with autocast:
                out = model(
                    input_ids=data.input_ids[idx].to(device),
                    attention_mask=data.attention_mask[idx].to(device),
                    labels=data.labels[idx].to(device),
                )
            (out.loss / t.grad_accum).backward()
            loss_sum += float(out.loss.detach()) / t.grad_accum
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        step += 1
        history["train_loss"].append([step, round(loss_sum, 5)])
        bar.set_postfix(loss=f"{loss_sum:.3f}")
        bar.update(1)
        if budget_s is not None:
            plan[0] = steps_that_fit(step, step - first_step, clock() - start, budget_s, t.steps)
            if step == plan[0] < t.steps:
                bar.write(
                    f"  time budget of {t.max_minutes:g} min reached: stopping at step {step} of {t.steps}"
                )
        if step % t.eval_every == 0 or step == plan[0]:
            val_ppl = evaluate(data.val)
            history["val"].append([step, round(math.log(val_ppl), 5), round(val_ppl, 4)])
            bar.write(f"  step {step}: validation perplexity {val_ppl:.3f}")
            if val_ppl < best:
                best, bad_evals = val_ppl, 0
                best_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
            else:
                bad_evals += 1
            if t.early_stopping_patience and bad_evals >= t.early_stopping_patience:
                bar.write(f"  early stop at step {step}: no improvement in {bad_evals} evaluations")
                stopped_early = True
        if step % t.save_every == 0 and step < plan[0] and not stopped_early:
            save_checkpoint(
                ckpt,
                model,
                optimizer,
                {"step": step, "best": best, "bad_evals": bad_evals, "history": history},
            )
            save_file({k: v.contiguous() for k, v in best_state.items()}, str(ckpt / "best.safetensors"))
        if stopped_early:
            break
    bar.close()
    seconds = clock() - start
    set_peft_model_state_dict(model, best_state)  # keep the best validation checkpoint

    blocks_key = base_key(app, data.test, dtype)
    test_base = cached_base_perplexity(app, blocks_key)
    base_cached = test_base is not None
    batches = math.ceil(len(data.test) / t.batch_size) * (2 if test_base is None else 1)
    with tqdm(total=batches, desc=f"held-out {spec.name}", unit="batch", disable=not progress) as ebar:
        test_expert = evaluate(data.test, bar=ebar)
        if test_base is None:  # the base model's figure depends only on the blocks: computed once
            test_base = evaluate(data.test, adapter=False, bar=ebar)
            save_base_perplexity(app, blocks_key, test_base)
    metrics = {
        "expert": spec.name,
        "profile": t.profile,
        "steps": step,
        "planned_steps": t.steps,
        "stopped_early": stopped_early,
        "max_minutes": t.max_minutes,
        "stopped_by_budget": step < t.steps and not stopped_early,
        "resumed_from_step": resumed,
        "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(1, step - (resumed or 0)), 3),
        "tokens_per_step": per_step * t.seq_len,
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "train_blocks": data.sources,
        "best_val_perplexity": round(best, 4),
        "test_perplexity": {"expert": round(test_expert, 4), "base": round(test_base, 4)},
        "test_ratio": round(test_expert / test_base, 4),
        "base_perplexity_cached": base_cached,  # artifacts/cache/base_perplexity: same blocks, same base
        "test_tokens": int(data.test.numel()),
        "history": history,
    }
    write_outputs(app, spec, model, out_dir, metrics)
    shutil.rmtree(ckpt, ignore_errors=True)
    return metrics


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------
def _train_one(app: AppConfig, spec: ExpertSpec, out_dir: Path) -> dict[str, Any]:
    m = train_expert(app, spec, out_dir)
    tp = m["test_perplexity"]
    budget = f" (time budget {m['max_minutes']:g} min)" if m["stopped_by_budget"] else ""
    print(
        f"{spec.name}: test perplexity {tp['base']:.2f} (base) -> {tp['expert']:.2f} (expert), "
        f"ratio {m['test_ratio']:.3f}, {m['steps']} of {m['planned_steps']} steps{budget} "
        f"in {m['seconds']:.0f} s -> {out_dir}"
    )
    return m


def train_all(app: AppConfig, overrides: list[str]) -> dict[str, Any]:
    """Train every configured expert, each composed with its own file; failures don't stop the rest."""
    from experts.config import compose

    results: dict[str, Any] = {}
    names = [e.name for e in app.experts]
    if app.train.num_workers_ray > 0:
        return _train_all_ray(app, names, overrides)
    for name in names:
        try:
            sub = compose([*overrides, f"expert={name}"])
            assert sub.expert is not None
            results[name] = _train_one(sub, sub.expert, sub.paths.expert_dir(name))
        except MoeError as exc:
            print(f"error: expert {name!r} failed: {exc}")
            results[name] = {"error": str(exc)}
    failed = [n for n, r in results.items() if "error" in r]
    if failed:
        raise MoeError(f"{len(failed)} of {len(names)} experts failed: {failed} (the others were trained)")
    return results


def _train_all_ray(app: AppConfig, names: list[str], overrides: list[str]) -> dict[str, Any]:
    """Branch-Train-Merge style: experts are independent, so train them as parallel Ray tasks."""
    import ray

    from experts.config import compose

    @ray.remote(num_gpus=app.train.gpus_per_task)
    def job(name: str) -> dict[str, Any]:
        sub = compose([*overrides, f"expert={name}"])
        assert sub.expert is not None
        try:
            return train_expert(sub, sub.expert, sub.paths.expert_dir(name), progress=False)
        except MoeError as exc:
            return {"error": str(exc)}

    ray.init(address=app.serve.ray_address, ignore_reinit_error=True, include_dashboard=False)
    refs = {n: job.remote(n) for n in names}
    results = {n: ray.get(r) for n, r in refs.items()}
    failed = [n for n, r in results.items() if "error" in r]
    if failed:
        raise MoeError(f"{len(failed)} of {len(names)} experts failed: {failed}")
    return results


def train_command(app: AppConfig, ctx: Any) -> float | None:
    """`moe train`: one expert, every expert (expert=all), or one sweep trial (-m)."""
    if app.expert is None:
        if not ctx.all_experts:
            raise MoeError(
                f"say which expert to train: expert=<slug> or expert=all; available: {app.expert_names()}"
            )
        train_all(app, ctx.overrides)
        return None
    out_dir = ctx.output_dir if ctx.multirun else app.paths.expert_dir(app.expert.name)
    metrics = _train_one(app, app.expert, out_dir)
    return float(metrics["best_val_perplexity"])  # what an Optuna sweep minimises

"""LoRA fine-tuning of one expert on its corpus, with validation, early stopping and resume.

`moe train expert=<slug>` writes artifacts/experts/<slug>/: the adapter in the standard PEFT layout
(adapter_model.safetensors + adapter_config.json, loadable by other LoRA servers), the resolved
config, metrics.json (loss curves, held-out perplexity of base and expert) and a model card.
In a sweep (-m) each trial writes into its own trial directory instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
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
from experts.blocks import token_blocks
from experts.config import AppConfig, ExpertSpec
from experts.data.instructions import load_instructions
from experts.errors import ArtifactError, DataError, MoeError
from experts.evaluate import block_nll, chat_example, perplexity

log = logging.getLogger(__name__)
MIXTURE = "mixture"  # data.source of the generalist: an equal mixture of every routable expert's corpus


@dataclasses.dataclass
class TrainData:
    """Training examples as fixed-length rows; labels -100 where no loss is taken."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    val: torch.Tensor  # validation token blocks
    test: torch.Tensor  # held-out test token blocks (same for every model of this domain)
    sources: dict[str, int]  # blocks per source corpus


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def _shuffled_texts(split: Any, seed: int) -> list[str]:
    texts = split["text"]  # one columnar read; row-by-row access is ~1000x slower
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    return [texts[i] for i in order]


def domain_blocks(slug: str, app: AppConfig, tokenizer: Any, split: str, n_blocks: int) -> torch.Tensor:
    """`n_blocks` token blocks of `seq_len` from one expert's corpus split (deterministic)."""
    from experts.data import load_corpus

    corpus = load_corpus(slug, app.paths)
    if split not in corpus:
        raise ArtifactError(f"corpus of {slug!r} has no {split!r} split; run `moe data expert={slug}`")
    return token_blocks(
        _shuffled_texts(corpus[split], app.train.seed), tokenizer, app.train.seq_len, n_blocks
    )


def _instruction_rows(
    rows: list[dict[str, str]], tokenizer: Any, seq_len: int, system: str
) -> tuple[torch.Tensor, ...]:
    """Chat-template prompt/response pairs, loss on the response tokens only."""
    ids_out, labels_out, mask_out = [], [], []
    for row in rows:
        ids, labels = chat_example(tokenizer, system, row["prompt"], row["response"], seq_len)
        pad = seq_len - len(ids)
        ids_out.append(ids + [tokenizer.pad_token_id] * pad)
        labels_out.append(labels + [-100] * pad)
        mask_out.append([1] * len(ids) + [0] * pad)
    return (
        torch.tensor(ids_out, dtype=torch.long),
        torch.tensor(labels_out, dtype=torch.long),
        torch.tensor(mask_out, dtype=torch.long),
    )


def build_train_data(
    app: AppConfig, spec: ExpertSpec, tokenizer: Any, extra_instructions: list[dict[str, str]] | None = None
) -> TrainData:
    """Token blocks for training, validation and test; the generalist mixes every routable corpus."""
    t = app.train
    want = t.steps * t.batch_size * t.grad_accum  # one pass: every step sees new blocks
    if t.max_train_blocks is not None:
        want = min(want, t.max_train_blocks)
    # Reviewed corrections are few and precious: each is seen `feedback_repeat` times, and corpus
    # blocks make room for them so they all fall inside the one pass (the corpus keeps >= half).
    feedback = list(extra_instructions or []) * t.feedback_repeat
    want = max(want - len(feedback), math.ceil(want / 2))
    tasks = _corpus_tasks(app, spec, round(want * t.instruction_ratio))
    want -= len(tasks)
    val_n, test_n = t.eval_batches * t.batch_size, t.test_batches * t.batch_size
    if spec.data.source == MIXTURE:
        domains = [e.name for e in app.experts if e.routable]
        if not domains:
            raise DataError("the generalist mixes the routable experts' corpora, but none is configured")
        share = math.ceil(want / len(domains))
        parts = {d: domain_blocks(d, app, tokenizer, "train", share) for d in domains}
        train = torch.cat(list(parts.values()))
        # validation/test of the mixture: equal slices of every domain
        val = torch.cat(
            [domain_blocks(d, app, tokenizer, "validation", max(1, val_n // len(domains))) for d in domains]
        )
        test = torch.cat(
            [domain_blocks(d, app, tokenizer, "test", max(1, test_n // len(domains))) for d in domains]
        )
        sources = {d: len(b) for d, b in parts.items()}
    else:
        train = domain_blocks(spec.name, app, tokenizer, "train", want)
        val = domain_blocks(spec.name, app, tokenizer, "validation", val_n)
        test = domain_blocks(spec.name, app, tokenizer, "test", test_n)
        sources = {spec.name: len(train)}
    if len(train) == 0 or len(val) == 0:
        raise DataError(
            f"expert {spec.name!r}: corpus too small for seq_len {t.seq_len} "
            f"({len(train)} train / {len(val)} validation blocks)"
        )
    ids, labels, mask = train, train.clone(), torch.ones_like(train)
    instructions = _load_instructions(app, spec) + feedback + tasks
    if feedback:
        sources["feedback"] = len(feedback)
    if tasks:
        sources["tasks"] = len(tasks)
    if instructions:
        i_ids, i_labels, i_mask = _instruction_rows(
            instructions, tokenizer, t.seq_len, spec.generation.system_prompt
        )
        ids, labels, mask = torch.cat([ids, i_ids]), torch.cat([labels, i_labels]), torch.cat([mask, i_mask])
        sources["instructions"] = len(i_ids)
    return TrainData(ids, labels, mask, val, test, sources)


def _load_instructions(app: AppConfig, spec: ExpertSpec) -> list[dict[str, str]]:
    if spec.data.source == MIXTURE or spec.data.instructions is None:
        return []
    from experts.data import load_corpus

    corpus = load_corpus(spec.name, app.paths)
    if "instructions" not in corpus:
        return []
    return [{"prompt": r["prompt"], "response": r["response"]} for r in corpus["instructions"]]


def _corpus_tasks(app: AppConfig, spec: ExpertSpec, n: int) -> list[dict[str, str]]:
    """`n` instruction tasks made from the train split(s) (`moe data` writes them; built here when a
    corpus predates them), a seeded sample; the generalist takes an equal share of every domain's."""
    from experts.data import load_card
    from experts.data.tasks import load_tasks, write_tasks

    if n <= 0:
        return []
    domains = [e for e in app.experts if e.routable] if spec.data.source == MIXTURE else [spec]
    share = math.ceil(n / max(1, len(domains)))
    out: list[dict[str, str]] = []
    for domain in domains:
        folder = app.paths.data_dir(domain.name)
        load_card(domain.name, app.paths)  # a clear error when the corpus is missing
        write_tasks(domain.name, domain.data.source, folder)
        rows = load_tasks(folder)
        random.Random(f"{app.train.seed}:{domain.name}").shuffle(rows)
        out.extend({"prompt": r["prompt"], "response": r["response"]} for r in rows[:share])
    return out[:n]


def feedback_instructions(app: AppConfig, spec: ExpertSpec) -> list[dict[str, str]]:
    """Reviewed corrections exported by `moe feedback export` (artifacts/feedback/<slug>.jsonl)."""
    path = app.paths.artifacts_dir / "feedback" / f"{spec.name}.jsonl"
    if not app.train.include_feedback or not path.exists() or not path.read_text().strip():
        return []
    return load_instructions(path)  # the same row-by-row validation as data.instructions


# ------------------------------------------------------------------------------------------------
# Checkpoints (safetensors + JSON only: nothing a user hands us is unpickled)
# ------------------------------------------------------------------------------------------------
def _save_checkpoint(ckpt: Path, model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    staged = ckpt.with_name(ckpt.name + ".part")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    model.save_pretrained(staged)
    tensors, groups = {}, []
    for i, (pid, pstate) in enumerate(optimizer.state_dict()["state"].items()):
        for key, value in pstate.items():
            tensors[f"{pid}.{key}"] = (
                value.detach().contiguous().clone() if torch.is_tensor(value) else torch.tensor(value)
            )
        assert i == pid
    for group in optimizer.state_dict()["param_groups"]:
        groups.append({k: v for k, v in group.items() if isinstance(v, int | float | bool | list)})
    save_file(tensors, str(staged / "optimizer.safetensors"))
    (staged / "state.json").write_text(json.dumps({**state, "param_groups": groups}, indent=1))
    shutil.rmtree(ckpt, ignore_errors=True)
    os.replace(staged, ckpt)


def _load_checkpoint(ckpt: Path, model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
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


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def _base_key(app: AppConfig, blocks: torch.Tensor, dtype: torch.dtype) -> str:
    """What the base model's perplexity on `blocks` depends on: the model, the tokens, the precision."""
    payload = json.dumps(
        [dataclasses.asdict(app.base_model), str(dtype), app.train.batch_size, list(blocks.shape)],
        sort_keys=True,
        default=str,
    ).encode()
    return hashlib.sha256(payload + blocks.numpy().tobytes()).hexdigest()[:20]


def _base_cache(app: AppConfig, key: str) -> Path:
    return app.paths.artifacts_dir / "cache" / "base_perplexity" / f"{key}.json"


def _cached_base_perplexity(app: AppConfig, key: str) -> float | None:
    try:
        return float(json.loads(_base_cache(app, key).read_text())["perplexity"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or unreadable: compute it again


def _save_base_perplexity(app: AppConfig, key: str, value: float) -> None:
    path = _base_cache(app, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f"{path.name}.{os.getpid()}.part")
    staged.write_text(json.dumps({"perplexity": value}))
    os.replace(staged, path)  # parallel trainers (Ray) may write the same key: last one wins, same value


def _config_record(app: AppConfig, spec: ExpertSpec) -> dict[str, Any]:
    return {
        "expert": dataclasses.asdict(spec),
        "base_model": dataclasses.asdict(app.base_model),
        "lora": dataclasses.asdict(app.lora),
        "train": dataclasses.asdict(app.train),
    }


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
        state = _load_checkpoint(ckpt, model, optimizer)
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
            _save_checkpoint(
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

    base_key = _base_key(app, data.test, dtype)
    test_base = _cached_base_perplexity(app, base_key)
    base_cached = test_base is not None
    batches = math.ceil(len(data.test) / t.batch_size) * (2 if test_base is None else 1)
    with tqdm(total=batches, desc=f"held-out {spec.name}", unit="batch", disable=not progress) as ebar:
        test_expert = evaluate(data.test, bar=ebar)
        if test_base is None:  # the base model's figure depends only on the blocks: computed once
            test_base = evaluate(data.test, adapter=False, bar=ebar)
            _save_base_perplexity(app, base_key, test_base)
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
    _write_outputs(app, spec, model, out_dir, metrics)
    shutil.rmtree(ckpt, ignore_errors=True)
    return metrics


def _write_outputs(
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

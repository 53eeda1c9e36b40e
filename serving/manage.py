"""`moe add-expert <slug>` and `moe remove-expert <slug>`: grow or shrink the system by one file.

add-expert validates conf/expert/<slug>.yaml before any work starts, builds the corpus, trains the
adapter (or registers a ready PEFT adapter given by `adapter_path`), retrains the router with the new
label, evaluates it, and - when an endpoint is running - updates it in place.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from experts.adapters import adapter_dir, check_adapter
from experts.config import AppConfig, ExpertSpec, compose, config_dir, expert_files, load_expert_file
from experts.errors import ConfigError, DataError, MoeError


def _slug_arg(ctx: Any, command: str) -> tuple[str, bool]:
    args = [a for a in ctx.args if a != "--force"]
    if len(args) != 1:
        raise MoeError(f"usage: moe {command} <slug> [--force] [key=value ...]")
    return args[0], "--force" in ctx.args


def expert_file(slug: str) -> Path:
    """conf/expert/<slug>.yaml, else the draft <slug>.yaml.proposed of `moe propose-experts`."""
    files = expert_files()
    if slug in files:
        return files[slug]
    draft = config_dir() / "expert" / f"{slug}.yaml.proposed"
    if draft.exists():
        return draft
    raise ConfigError(
        f"no {config_dir() / 'expert' / (slug + '.yaml')}; write it first "
        f"(see README 'Add your own expert'); existing experts: {sorted(files)}"
    )


def accept_draft(slug: str) -> Path:
    """A validated draft becomes conf/expert/<slug>.yaml (the `.proposed` name goes)."""
    path = expert_file(slug)
    if path.name.endswith(".proposed"):
        target = path.with_name(f"{slug}.yaml")
        path.rename(target)
        print(f"accepted the proposal: {path.name} -> {target.name}")
        return target
    return path


def validate_new_expert(slug: str, app: AppConfig, force: bool = False) -> ExpertSpec:
    """Everything that can be checked before any work starts, each failure one clear line."""
    spec = load_expert_file(expert_file(slug))  # unknown keys, slug vs file name, value ranges
    data = spec.data
    if data.source in ("folder", "jsonl"):
        if not data.path:
            raise ConfigError(f"expert {slug!r}: data.source {data.source!r} needs data.path")
        path = Path(data.path).expanduser()
        if not path.exists():
            raise DataError(f"expert {slug!r}: data.path {path} does not exist")
        if path.is_dir() and not any(p.is_file() for p in path.rglob("*")):
            raise DataError(f"expert {slug!r}: data.path {path} has no files")
    if data.source == "hf" and os.environ.get("HF_HUB_OFFLINE", "0") == "1":
        raise DataError(
            f"expert {slug!r}: data.source 'hf' needs the Hugging Face Hub; set HF_HUB_OFFLINE=0 "
            "where the Hub is reachable"
        )
    if spec.adapter_path:
        check_adapter(slug, Path(spec.adapter_path).expanduser())
    elif not force and (app.paths.expert_dir(slug) / "adapter_model.safetensors").exists():
        raise ConfigError(
            f"expert {slug!r} already exists (adapter at {app.paths.expert_dir(slug)}); "
            f"retrain with `moe train expert={slug}` or re-add with --force"
        )
    return spec


def add_expert(
    app: AppConfig, slug: str, overrides: list[str], force: bool = False, endpoint: str | None = None
) -> dict[str, Any]:
    """The whole add, in order; returns timings and the new expert's numbers."""
    from experts.data import build_corpus, load_card
    from experts.train import train_expert
    from router.train import train_router

    spec = validate_new_expert(slug, app, force)
    accept_draft(slug)
    sub = compose([*overrides, f"expert={slug}"])
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    print(f"[1/4] corpus for {slug!r}")
    build_corpus(spec, sub, force=force)
    card = load_card(slug, sub.paths)
    timings["data_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    result: dict[str, Any] = {"expert": slug, "train_tokens": card.get("train_tokens")}
    if spec.adapter_path:
        print(f"[2/4] registering the ready adapter at {spec.adapter_path} (no training)")
    else:
        print(f"[2/4] training the {slug!r} adapter (profile {sub.train.profile})")
        metrics = train_expert(sub, spec, sub.paths.expert_dir(slug))
        result["test_perplexity"] = metrics["test_perplexity"]
    timings["train_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    print(f"[3/4] retraining the router with label {slug!r}")
    router, rmetrics = train_router(sub)
    timings["router_s"] = round(time.perf_counter() - t0, 1)
    examples = list(spec.examples) or []
    if examples:
        picks = [d.expert for d in router.decide(examples, policy="top1")]
        result["examples_routed_to_new_expert"] = f"{picks.count(slug)}/{len(examples)}"
    result["router_accuracy"] = rmetrics.get("accuracy_top1")
    t0 = time.perf_counter()
    print("[4/4] updating the running endpoint")
    result["endpoint"] = update_endpoint(sub, endpoint)
    timings["update_s"] = round(time.perf_counter() - t0, 1)
    result["timings"] = timings
    return result


def update_endpoint(app: AppConfig, url: str | None = None) -> str:
    """Tell a running endpoint to load new adapters and swap in the new router; no downtime."""
    import httpx

    base = url or f"http://{app.serve.host}:{app.serve.port}"
    from serving.api import api_keys

    keys = api_keys(app.serve)  # the endpoint's own: $serve.api_keys_env, then serve.api_keys_file
    headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
    try:
        httpx.get(f"{base}/health", timeout=3).raise_for_status()
    except httpx.HTTPError:
        return f"no endpoint running at {base}; the next `moe serve` loads what is trained now"
    reply = httpx.post(f"{base}/admin/reload", headers=headers, timeout=600)
    if reply.status_code != 200:
        raise MoeError(f"endpoint at {base} refused the reload ({reply.status_code}): {reply.text[:300]}")
    return f"endpoint at {base} updated: {reply.json()}"


def add_expert_command(app: AppConfig, ctx: Any) -> dict[str, Any]:
    slug, force = _slug_arg(ctx, "add-expert")
    started = time.perf_counter()
    result = add_expert(app, slug, ctx.overrides, force)
    result["total_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=1))
    return result


def remove_expert_command(app: AppConfig, ctx: Any) -> dict[str, Any]:
    """Take an expert out: router retrained without it, endpoint updated, its file set aside."""
    from router.train import train_router

    slug, _ = _slug_arg(ctx, "remove-expert")
    files = expert_files()
    if slug not in files:
        raise ConfigError(f"no expert {slug!r}; existing experts: {sorted(files)}")
    remaining = [e.name for e in app.experts if e.name != slug]
    sub = compose([*ctx.overrides, f"experts=[{','.join(remaining)}]"])
    print(f"retraining the router without {slug!r}")
    train_router(sub)
    moved = files[slug].with_suffix(".yaml.removed")
    files[slug].rename(moved)
    status = update_endpoint(sub)  # not compose(ctx.overrides): an `experts=[...]` naming slug fails now
    print(
        f"removed {slug!r}: config moved to {moved} (rename it back to restore); its adapter and corpus "
        f"stay in {adapter_dir(app.get_expert(slug), app.paths)} and {app.paths.data_dir(slug)}\n{status}"
    )
    return {"removed": slug, "endpoint": status}


def reload_command(app: AppConfig, ctx: Any) -> str:
    """`moe reload`: a running endpoint picks up retrained adapters and a retrained router."""
    status = update_endpoint(app)
    print(status)
    return status

"""`moe demo`: the whole system end to end, reusing whatever is already built.

base model -> corpora -> one adapter per expert (quick profile) -> router -> endpoint on 127.0.0.1 ->
one example question per expert through the official `openai` client. A second run finds
everything cached and reaches the examples in about a minute. DEMO_EXIT=1 exits after them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from typing import Any

from experts.adapters import adapter_dir
from experts.base_model import ensure_base_model
from experts.config import AppConfig, compose

BUDGET_PROFILE = "train=budget"  # conf/train/budget.yaml


def demo_overrides(overrides: list[str], fast_training: bool) -> list[str]:
    """The demo's overrides: where training is slow (a CPU without native bf16 and no GPU) the
    time-budgeted training profile is added, unless the user chose a training profile or setting
    (any `train...` override)."""
    if fast_training or any(o.lstrip("+~").startswith("train") for o in overrides):
        return list(overrides)
    return [*overrides, BUDGET_PROFILE]


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _adapter_is_current(app: AppConfig, name: str) -> bool:
    """An adapter is reused when it exists and was trained with the same LoRA/train settings."""
    spec = app.get_expert(name)
    folder = adapter_dir(spec, app.paths)
    if not (folder / "adapter_model.safetensors").exists():
        return False
    if spec.adapter_path:
        return True
    try:
        saved = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return saved.get("lora") == json.loads(json.dumps(dataclasses.asdict(app.lora))) and saved.get(
        "train"
    ) == json.loads(json.dumps(dataclasses.asdict(app.train)))


def prepare(app: AppConfig, overrides: list[str]) -> None:
    """Everything the endpoint needs, built only where missing or stale."""
    from experts.data import build_corpus
    from experts.train import train_expert
    from router.model import load_router
    from router.train import train_router

    t0 = _step(f"base model {app.base_model.name}")
    print(f"ready at {ensure_base_model(app.base_model, app.paths)} ({time.perf_counter() - t0:.0f} s)")
    routable = [e for e in app.experts if e.routable]
    t0 = _step(f"corpora for {len(routable)} experts")
    for spec in routable:  # each build shows its own bars: documents read, de-duplicated, tokenized
        build_corpus(spec, app, progress=True)
    print(f"corpora ready ({time.perf_counter() - t0:.0f} s)")
    t0 = _step(f"LoRA adapters (train profile '{app.train.profile}')")
    for spec in routable:
        sub = compose([*overrides, f"expert={spec.name}"])
        if _adapter_is_current(sub, spec.name):
            print(f"{spec.name}: adapter up to date, reused")
            continue
        assert sub.expert is not None
        m = train_expert(sub, sub.expert, sub.paths.expert_dir(spec.name))
        tp = m["test_perplexity"]
        print(f"{spec.name}: perplexity {tp['base']:.2f} -> {tp['expert']:.2f} in {m['seconds']:.0f} s")
    print(f"adapters ready ({time.perf_counter() - t0:.0f} s)")
    t0 = _step(f"router ({app.router.pipeline})")
    try:
        load_router(app)
        print("router up to date, reused")
    except Exception:  # missing, or trained for other labels: retrain
        train_router(app)
    print(f"router ready ({time.perf_counter() - t0:.0f} s)")


def ask_examples(app: AppConfig, base_url: str) -> list[dict[str, Any]]:
    """One example question per expert through the official openai client, model='auto'."""
    from openai import OpenAI

    from serving.api import api_keys

    keys = api_keys(app.serve)  # $serve.api_keys_env and serve.api_keys_file, as the server reads them
    key = os.environ.get("MOE_DEMO_API_KEY") or (keys[0] if keys else "unused")  # the server's own key
    client = OpenAI(base_url=base_url, api_key=key, timeout=120)
    answers = []
    for spec in (e for e in app.experts if e.routable):
        for question in spec.examples[:1]:
            t0 = time.perf_counter()
            reply = client.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": question}], max_tokens=64, temperature=0
            )
            routing = (reply.model_extra or {}).get("routing", {})
            text = (reply.choices[0].message.content or "").strip().replace("\n", " ")
            print(f"\nQ [{spec.name}]: {question}")
            print(
                f"-> expert={routing.get('expert')} decision={routing.get('decision')} "
                f"confidence={routing.get('confidence', 0):.2f} ({time.perf_counter() - t0:.1f} s)"
            )
            print(f"A: {text[:400]}")
            answers.append({"question": question, "intended": spec.name, "routing": routing, "answer": text})
    right = sum(a["routing"].get("expert") == a["intended"] for a in answers)
    print(f"\nrouted {right} of {len(answers)} example questions to their intended expert")
    return answers


def demo_command(app: AppConfig, ctx: Any) -> None:
    from experts.base_model import pick_device
    from experts.hardware import native_bf16
    from serving.app import start_server, stop_server

    start = time.perf_counter()
    fast = pick_device(app.train.device) == "cuda" or native_bf16()  # the trainer's own device choice
    overrides = demo_overrides(list(ctx.overrides), fast)
    if overrides != list(ctx.overrides):
        print(
            f"this CPU has no native bf16: the adapters train on a time budget ({BUDGET_PROFILE}, "
            "conf/train/budget.yaml); pass train=quick for the full quick profile",
            flush=True,
        )
        app = compose(overrides)
    prepare(app, overrides)
    t0 = _step("endpoint")
    url = start_server(app)
    print(f"serving at {url} ({time.perf_counter() - t0:.0f} s)")
    try:
        ask_examples(app, url)
        print(f"\ndemo reached its examples in {time.perf_counter() - start:.0f} s")
        if os.environ.get("DEMO_EXIT"):
            return
        print(
            f"\nstill serving at {url} - try:\n  curl -s {url}/chat/completions -H 'Content-Type: application/json' "
            '-d \'{"model": "auto", "messages": [{"role": "user", "content": "What does fork() return?"}]}\''
            "\nCtrl-C stops."
        )
        stopped = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stopped.set())
        while not stopped.is_set():
            stopped.wait(1.0)
    except KeyboardInterrupt:
        print("\nstopping")
    finally:
        stop_server()

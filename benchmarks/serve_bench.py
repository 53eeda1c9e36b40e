"""Serving benchmark: the Ray Serve endpoint against a naive baseline measured in the same run.

    .venv/bin/python benchmarks/serve_bench.py            # real SmolLM2-135M base, six experts
    .venv/bin/python benchmarks/serve_bench.py --quick    # fewer requests (a smoke run)
    .venv/bin/python benchmarks/serve_bench.py --served-only serve.pool.engine=thread   # A/B of settings
    .venv/bin/python benchmarks/serve_bench.py --avx2     # as an AVX2-only CPU runs it (bandwidth not imitated)
    .venv/bin/python benchmarks/serve_bench.py --served-only --engines process,vllm   # both engines side by side

- Throughput and latency at concurrency 1, 8 and 32 (32-token prompts, exactly 64 new tokens,
  requests spread round-robin over the experts), for
  naive: one full model per expert (adapter merged), one HF `generate` per request, one request at
  a time (what a straightforward server does), and
  served: the real endpoint over HTTP (ingress + expert pool, mixed-expert batches).
- Memory: one base + N adapters vs N separate models (parameter bytes, at the serving dtype).
- Routing overhead: model=auto vs the same expert forced (1 new token), and POST /v1/route.
- Engines (`--engines process,vllm`): the endpoint is started once per engine (`serve.pool.engine`)
  and measured the same way; the side-by-side table adds each engine process's resident memory.

Adapters are random-init LoRA (r=16 on q,k,v,o) on the real base: their cost is exactly that of
trained ones. The router is the trained one when artifacts/router matches the experts, else a
TF-IDF router fitted on synthetic text (its cost per query is what is measured).
The machine (CPU flags, torch's AVX2 caps) and the read bandwidth are recorded beside the figures;
the batch-1 roofline is that bandwidth over the bytes of base weights a token reads in the layout
the pool serves (`Decoder.token_bytes`: e.g. bf16 storage for an fp32 pool).
Results: artifacts/bench/serve.json; the table for docs/benchmarks.md is printed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import torch  # noqa: E402
from decode_bench import imitate_avx2  # noqa: E402  (benchmarks/ is on sys.path)

from experts.adapters import ExpertPool  # noqa: E402
from experts.base_model import load_base_model, load_tokenizer  # noqa: E402
from experts.config import AppConfig, compose  # noqa: E402
from experts.hardware import machine_report, read_bandwidth_gb_s  # noqa: E402
from serving.engine import serving_weights  # noqa: E402
from serving.engine.packed import layout  # noqa: E402
from serving.engine.prepare import decoder_for, lora_stack  # noqa: E402

PROMPT_TOKENS = 32
NEW_TOKENS = 64
CONCURRENCY = (1, 8, 32)
PORT = 8311


def make_adapters(app: AppConfig, names: list[str], root: Path) -> None:
    """Random-init LoRA adapters (r=16, q,k,v,o) on the real base, saved as safetensors."""
    from peft import LoraConfig, get_peft_model

    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        model = get_peft_model(
            load_base_model(app.base_model, app.paths),
            LoraConfig(
                r=16,
                lora_alpha=32,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                init_lora_weights=False,
            ),
        )
        model.save_pretrained(root / "experts" / name)


def make_router(app: AppConfig, names: list[str], root: Path) -> str:
    """The trained router if it fits these experts, else TF-IDF on synthetic text."""
    import random

    from router.data import Examples
    from router.features import TfidfFeatures
    from router.model import Router, load_router
    from router.train import fit_router

    try:
        load_router(compose([]))
        Router.load(compose([]).paths.router_dir).save(root / "router")
        return "trained (artifacts/router)"
    except Exception:  # missing or trained for other experts: fit a stand-in
        pass

    def examples(seed: int) -> Examples:
        rng = random.Random(seed)
        out = Examples()
        for name in names:
            words = [f"{name}{k}" for k in range(30)] + ["the", "of", "and", "what", "is"]
            out.add([" ".join(rng.choice(words) for _ in range(12)) for _ in range(60)], name, ["w"] * 60)
        return out

    router, _ = fit_router(names, examples(0), examples(1), app.router, TfidfFeatures())
    router.save(root / "router")
    return "tfidf on synthetic text (no matching trained router)"


def prompts(app: AppConfig, n: int) -> list[str]:
    """n distinct prompts of exactly PROMPT_TOKENS tokens (decoded back to text)."""
    tok = load_tokenizer(app.base_model, app.paths)
    words = [
        "the",
        "patient",
        "licence",
        "module",
        "kernel",
        "scripture",
        "congress",
        "study",
        "court",
        "function",
        "law",
        "history",
    ]
    out = []
    for i in range(n):
        text = " ".join(words[(i + k) % len(words)] for k in range(60))
        out.append(tok.decode(tok(text).input_ids[:PROMPT_TOKENS]))
    return out


def summarise(latencies: list[float], tokens: int, wall: float) -> dict[str, Any]:
    lat = sorted(latencies)
    return {
        "requests": len(lat),
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "throughput_tok_s": round(tokens / wall, 1),
        "latency_p50_s": round(statistics.median(lat), 2),
        "latency_p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 2),
    }


def drive(call: Any, concurrency: int, total: int) -> dict[str, Any]:
    """`total` requests from `concurrency` client threads; call(i) -> completion tokens."""
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def one(i: int) -> None:
        t0 = time.perf_counter()
        n = call(i)
        with lock:
            latencies.append(time.perf_counter() - t0)
            tokens[0] += n

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(total)))
    return summarise(latencies, tokens[0], time.perf_counter() - start)


def sweep(label: str, call: Any, totals: dict[int, int]) -> dict[int, Any]:
    results = {}
    for c in CONCURRENCY:
        results[c] = drive(call, c, totals[c])
        print(f"{label} concurrency {c}: {results[c]}", flush=True)
    return results


# --------------------------------------------------------------------------------------------
def bench_naive(
    app: AppConfig, names: list[str], texts: list[str], totals: dict[int, int], dtype: Any
) -> Any:
    """One full model per expert (merged adapter), one generate per request, one at a time."""
    from peft import PeftModel

    tok = load_tokenizer(app.base_model, app.paths)
    models = {}
    for name in names:
        peft = PeftModel.from_pretrained(
            load_base_model(app.base_model, app.paths), app.paths.expert_dir(name)
        )
        models[name] = peft.merge_and_unload().to(dtype).eval()
    one_model = sum(p.numel() * p.element_size() for p in models[names[0]].parameters())
    busy = threading.Lock()  # a naive server answers one request at a time

    def call(i: int) -> int:
        name = names[i % len(names)]
        ids = tok(texts[i % len(texts)], return_tensors="pt")
        with busy, torch.inference_mode():
            out = models[name].generate(
                **ids,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        return int(out.shape[1] - ids.input_ids.shape[1])

    call(0)  # warm-up
    return sweep("naive", call, totals), one_model


def request_body(names: list[str], texts: list[str], i: int) -> dict[str, Any]:
    """Request i of a run: experts and prompts round-robin, exactly NEW_TOKENS greedy tokens."""
    return {
        "model": names[i % len(names)],
        "prompt": texts[i % len(texts)],
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
    }


def bench_served(url: str, names: list[str], texts: list[str], totals: dict[int, int]) -> dict[int, Any]:
    client = httpx.Client(timeout=600)

    def call(i: int) -> int:
        reply = client.post(f"{url}/completions", json=request_body(names, texts, i))
        reply.raise_for_status()
        body = reply.json()
        assert body["usage"]["prompt_tokens"] <= PROMPT_TOKENS + 2, body["usage"]
        return int(body["usage"]["completion_tokens"])

    call(0)  # warm-up
    return sweep("served", call, totals)


def stream(client: httpx.Client, url: str, body: dict[str, Any]) -> tuple[list[float], int]:
    """One streamed completion: when each chunk of text arrived, and the completion tokens."""
    stamps, tokens = [], 0
    with client.stream("POST", f"{url}/completions", json={**body, "stream": True}) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"][0]["text"]:
                stamps.append(time.perf_counter())
            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    return stamps, tokens


def bench_stream(url: str, names: list[str], texts: list[str], repeats: int) -> dict[str, Any]:
    """Batch-1 decode speed as a client sees it: one streamed request at a time, tokens after the
    first over the time from the first to the last chunk of text (the first chunk is the first
    token alone; later ones carry what came in each `serve.stream_interval_s`), and the time to
    the first and to the last token; medians of `repeats`."""
    client = httpx.Client(timeout=600)
    rates, firsts, lasts = [], [], []
    for i in range(repeats + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        stamps, tokens = stream(client, url, request_body(names, texts, i))
        if i and len(stamps) > 1:
            rates.append((tokens - 1) / (stamps[-1] - stamps[0]))
            firsts.append(stamps[0] - t0)
            lasts.append(stamps[-1] - t0)
    return {
        "repeats": len(rates),
        "decode_tok_s": round(statistics.median(rates), 1),
        "time_to_first_token_s": round(statistics.median(firsts), 3),
        "time_to_last_token_s": round(statistics.median(lasts), 3),
    }


def bench_streams(url: str, names: list[str], texts: list[str], total: int) -> dict[str, Any]:
    """`total` streamed requests at once (what chat clients send): every chunk crosses the pool,
    the ingress and the proxy, so this is where `serve.stream_interval_s` pays."""
    client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=total))
    return drive(lambda i: stream(client, url, request_body(names, texts, i))[1], total, total)


def bench_routing(url: str, expert: str, repeats: int) -> dict[str, Any]:
    client = httpx.Client(timeout=120)
    question = f"{expert} " * 12

    def timed(path: str, body: dict[str, Any]) -> float:
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            client.post(f"{url}/{path}", json=body).raise_for_status()
            samples.append(time.perf_counter() - t0)
        return round(statistics.median(samples) * 1000, 1)

    one = {"prompt": question, "max_tokens": 1, "temperature": 0}
    timed("completions", {**one, "model": "auto"})  # warm-up
    auto = timed("completions", {**one, "model": "auto"})
    forced = timed("completions", {**one, "model": expert})
    route = timed("route", {"text": question})
    return {"auto_ms": auto, "forced_ms": forced, "overhead_ms": round(auto - forced, 1), "route_ms": route}


def engine_rss_mib(pid: int) -> float:
    """Resident memory of a pool's engine process (base, adapters, KV cache, runtime), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for process {pid}")


def bench_endpoint(
    app: AppConfig, names: list[str], texts: list[str], totals: dict[int, int], quick: bool
) -> Any:
    """Start the endpoint of `app`, measure it (throughput at each concurrency, one stream, 32
    streams, routing, the engine process's memory), stop it."""
    from ray import serve

    from serving.app import APP_NAME, start_server, stop_server

    print(f"served ({app.serve.pool.engine} engine) ...", flush=True)
    url = start_server(app)
    try:
        result: dict[str, Any] = {
            "served": {str(c): v for c, v in bench_served(url, names, texts, totals).items()},
            "stream": bench_stream(url, names, texts, 3 if quick else 7),
            "streams_32": bench_streams(url, names, texts, 32),
        }
        repeats = 5 if quick else 20
        result["routing"] = {**bench_routing(url, names[0], repeats), "repeats": repeats}
        pool = serve.get_deployment_handle(f"pool_{app.base_model.name}", APP_NAME)
        info = pool.info.remote().result()
        pid = info.get("engine_pid")
        result["engine"] = {
            "engine": app.serve.pool.engine,
            "dtype": info["dtype"],
            "rss_mib": None if pid is None else engine_rss_mib(pid),  # thread engine: in the replica
        }
    finally:
        stop_server()
    return result


def engines_table(r: dict[str, Any]) -> str:
    """Both engines side by side (`--engines`): the same load, one endpoint each."""
    rows = [
        "| engine | dtype | c=1 streamed tok/s | c=1 tok/s | c=8 tok/s | c=32 tok/s | 32 streams tok/s | engine RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in r["engines"].items():
        served = " | ".join(str(e["served"][str(c)]["throughput_tok_s"]) for c in CONCURRENCY)
        rows.append(
            f"| {name} | {e['engine']['dtype']} | {e['stream']['decode_tok_s']} | {served} | "
            f"{e['streams_32']['throughput_tok_s']} | {e['engine']['rss_mib']} |"
        )
    return "\n".join(rows)


def pool_bytes(pool: ExpertPool, lora: bool = True) -> int:
    """Bytes the pool holds as it serves, each storage counted once: its parameters (peft's LoRA
    parameters are views into the fp32 LoRA stack, counted with it; lora=False: the base model
    alone) and its base weights packed in a kernel's layout (`serving.engine.packed`)."""
    from serving.engine.packed import packed_groups

    stacked = lora_stack(pool) if lora else None
    stack = stacked.groups.values() if stacked else ()
    tensors = [t for g in stack for t in (g.a, g.scale, *g.b)]
    tensors += [p for name, p in pool.model.named_parameters() if lora or "lora_" not in name]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values()) + sum(g.nbytes() for g in packed_groups(pool.model))


def memory(app: AppConfig, names: list[str], dtype: Any) -> dict[str, Any]:
    """Bytes the pool of these experts holds as it serves (`pool_bytes`), base weights at the
    serving dtype and layout."""
    pool = ExpertPool.load(app, names, device="cpu")
    assert pool.dtype == dtype, (pool.dtype, dtype)
    serving_weights(pool, app.serve.pool.base_weights)
    return {"pool_bytes": pool_bytes(pool), "base_layout": layout(pool.model)}


def bandwidth(weight_bytes: int, repeats: int = 5) -> dict[str, Any]:
    """The physical limit of batch-1 decoding here: every weight is read once per token, so
    tokens/s <= read bandwidth / weight bytes. The bandwidth is measured, not assumed: torch
    summing one 512 MiB fp32 tensor at the pool's thread count (median of `repeats`)."""
    gb_s = read_bandwidth_gb_s(repeats)
    return {
        "read_gb_s": round(gb_s, 1),
        "weight_bytes_per_token": weight_bytes,
        "limit_tok_s": round(gb_s * 1e9 / weight_bytes, 1),
    }


def machine() -> dict[str, Any]:
    return machine_report(bandwidth=False)  # the bandwidth is measured at the pool's threads (bandwidth())


def table(r: dict[str, Any]) -> str:
    """The summary for docs/benchmarks.md; the naive and memory parts only when they ran."""
    naive = r.get("naive")
    if naive:
        rows = [
            "| concurrency | naive tok/s | served tok/s | speed-up | naive p50 / p95 s | served p50 / p95 s |",
            "|---|---|---|---|---|---|",
        ]
    else:
        rows = ["| concurrency | served tok/s | served p50 / p95 s |", "|---|---|---|"]
    for c in CONCURRENCY:
        s = r["served"][str(c)]
        served = f"{s['latency_p50_s']} / {s['latency_p95_s']} |"
        if naive:
            n = naive[str(c)]
            rows.append(
                f"| {c} | {n['throughput_tok_s']} | {s['throughput_tok_s']} | "
                f"{s['throughput_tok_s'] / n['throughput_tok_s']:.1f}x | "
                f"{n['latency_p50_s']} / {n['latency_p95_s']} | {served}"
            )
        else:
            rows.append(f"| {c} | {s['throughput_tok_s']} | {served}")
    rows.append("")
    if "memory" in r:
        m = r["memory"]
        rows.append(
            f"Memory ({len(r['experts'])} experts, {r['dtype']} weights): one base + adapters "
            f"{m['pool_bytes'] / 2**20:.0f} MiB vs {len(r['experts'])} separate models "
            f"{m['separate_bytes'] / 2**20:.0f} MiB; one model {m['one_model_bytes'] / 2**20:.0f} MiB "
            f"-> pool = {m['pool_vs_one_model']:.2f}x one model."
        )
    rt, st = r["routing"], r["stream"]
    rows += [
        f"Routing (median of {rt['repeats']}, 1 new token): auto {rt['auto_ms']} ms vs forced "
        f"{rt['forced_ms']} ms (overhead {rt['overhead_ms']} ms); POST /v1/route {rt['route_ms']} ms "
        f"({r['router']}).",
        f"Batch-1 decode through the endpoint: {r['served']['1']['throughput_tok_s']} tok/s end to end; "
        f"streamed, {st['decode_tok_s']} tok/s after the first token (first token after "
        f"{st['time_to_first_token_s']} s; median of {st['repeats']}).",
        limit_line(r),
        streams_line(r),
    ]
    return "\n".join(rows)


def streams_line(r: dict[str, Any]) -> str:
    s, plain = r["streams_32"], r["served"].get("32")
    same = f" (the same 32 not streamed: {plain['throughput_tok_s']})" if plain else ""
    return f"32 concurrent streams: {s['throughput_tok_s']} tok/s{same}, stream_interval_s {r['serve']['stream_interval_s']}."


def limit_line(r: dict[str, Any]) -> str:
    b = r["bandwidth"]
    return (
        f"Bandwidth limit: {b['read_gb_s']} GB/s read (measured) / {b['weight_bytes_per_token'] / 1e6:.0f} MB "
        f"of weights a token ({r['dtype']} pool, layers {r['serve']['base_layout']}) = {b['limit_tok_s']} tok/s; "
        f"streamed decode is {r['stream']['of_limit']:.0%} of it. CPU {r['machine']['cpu_kind']} "
        f"(flags {' '.join(r['machine']['cpu_flags'])}; capped to AVX2: {r['machine']['capped_to_avx2']})."
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer requests (smoke run)")
    parser.add_argument(
        "--served-only",
        action="store_true",
        help="skip the naive baseline and memory (A/B of serve settings)",
    )
    parser.add_argument("--experts", type=int, default=6, help="number of experts (routable ones first)")
    parser.add_argument("--out", default=None, help="JSON output (default artifacts/bench/serve.json)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. serve.pool.torch_threads=1")
    parser.add_argument(
        "--avx2", action="store_true", help="imitate an AVX2-only CPU (bandwidth not imitated)"
    )
    parser.add_argument(
        "--concurrency", default=None, help="comma-separated client concurrencies (default 1,8,32)"
    )
    parser.add_argument(
        "--engines",
        default=None,
        help="comma-separated pool engines to measure side by side, e.g. process,vllm "
        "(default: serve.pool.engine of the config alone)",
    )
    args = parser.parse_args()
    imitate_avx2()
    global CONCURRENCY
    if args.concurrency:
        CONCURRENCY = tuple(int(c) for c in args.concurrency.split(","))
    # requests per concurrency: a few rounds of the clients (one round for c >= 32)
    totals = {c: c if c >= 32 else max(2, c) * (1 if args.quick else 2) for c in CONCURRENCY}
    base_app = compose(args.overrides)
    out = Path(args.out or base_app.paths.artifacts_dir / "bench" / "serve.json")
    names = [e.name for e in base_app.experts if e.routable][: args.experts]
    torch.set_num_threads(base_app.serve.pool.torch_threads)
    with tempfile.TemporaryDirectory(prefix="serve_bench_") as tmp:
        root = Path(tmp) / "artifacts"
        app_overrides = [
            f"experts=[{','.join(names)}]",
            f"paths.artifacts={root}",
            f"serve.port={PORT}",
            "serve.max_batch_size=32",
            *args.overrides,
        ]
        app = compose(app_overrides)
        print(f"adapters for {names} (random-init LoRA r=16 q,k,v,o on {app.base_model.name})", flush=True)
        make_adapters(app, names, root)
        router_kind = make_router(app, names, root)
        texts = prompts(app, 64)
        probe = ExpertPool.load(app, [], device="cpu")
        dtype = probe.dtype
        serving_weights(probe, app.serve.pool.base_weights)
        fast = decoder_for(probe)
        weight_bytes = (
            fast.token_bytes() if fast else sum(p.numel() for p in probe.model.parameters()) * dtype.itemsize
        )
        base_layout = layout(probe.model)
        del probe, fast
        result: dict[str, Any] = {
            "machine": machine(),
            "base_model": app.base_model.name,
            "experts": names,
            "dtype": str(dtype).removeprefix("torch."),
            "prompt_tokens": PROMPT_TOKENS,
            "new_tokens": NEW_TOKENS,
            "requests": {str(c): totals[c] for c in CONCURRENCY},
            "router": router_kind,
            "serve": {
                "max_batch_size": app.serve.max_batch_size,
                "pool_torch_threads": app.serve.pool.torch_threads,
                "pool_num_cpus": app.serve.pool.num_cpus,
                "pool_engine": app.serve.pool.engine,
                "stream_interval_s": app.serve.stream_interval_s,
                "base_weights": app.serve.pool.base_weights,
                "base_layout": base_layout,
            },
            "bandwidth": bandwidth(weight_bytes),
        }
        if not args.served_only:
            print("naive baseline ...", flush=True)
            naive, one_model = bench_naive(app, names, texts, totals, dtype)
            result["naive"] = {str(c): v for c, v in naive.items()}
            mem = memory(app, names, dtype)
            result["memory"] = {
                **mem,
                "one_model_bytes": one_model,
                "separate_bytes": one_model * len(names),
                "pool_vs_one_model": round(mem["pool_bytes"] / one_model, 3),
            }
        engines = args.engines.split(",") if args.engines else [app.serve.pool.engine]
        result["engines"] = {}
        for engine in engines:
            with_engine = compose([*app_overrides, f"serve.pool.engine={engine}"])
            measured = bench_endpoint(with_engine, names, texts, totals, args.quick)
            one = measured["stream"]
            one["of_limit"] = round(one["decode_tok_s"] / result["bandwidth"]["limit_tok_s"], 3)
            result["engines"][engine] = measured
        result.update(result["engines"][engines[0]])  # the first engine's figures, as before
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print("\n" + table(result))
    if len(result["engines"]) > 1:
        print("\n" + engines_table(result))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()

"""In-process decode speed of the expert pool (no Ray, no HTTP): what the engine itself can do.

    .venv/bin/python benchmarks/decode_bench.py [--rounds 5] [--avx2] [serve.pool.torch_threads=1 ...]

- Throughput of `serving.engine.generate` at batch 1, 8 and 32 (32-token prompts, exactly 64 new
  tokens, greedy, rows round-robin over the trained experts in artifacts/experts/), the real base
  model at the serving dtype (`serving_weights`), torch threads = serve.pool.torch_threads. The
  batch sizes alternate within each round; medians over the rounds (the machine may be busy).
- Where one batch-1 token goes: the base weights' matmuls (`serving.engine.decoder.linear`), the LoRA,
  the rest of the forward (norms, RoPE, cache writes, attention), and the engine around it
  (mixing, sampling, detokenising).
- The machine (CPU flags, read bandwidth at the pool's threads, `experts.hardware.machine_report`)
  and batch 1 as a share of its roofline: that bandwidth over the bytes of base weights a token
  reads in the layout served (`Decoder.token_bytes`).
`--avx2` reruns the script as an AVX2-only CPU would run it (`experts.hardware.AVX2_ENV`: torch's
kernels, oneDNN and MKL capped at AVX2; the memory bandwidth is this machine's).
Compare batch 1 with the endpoint's batch-1 tok/s (benchmarks/serve_bench.py): the difference is
Ray Serve + HTTP per token. Saves artifacts/bench/decode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import serving.engine.decoder as decoder  # noqa: E402
from experts.adapters import ExpertPool  # noqa: E402
from experts.config import compose  # noqa: E402
from experts.hardware import AVX2_ENV, machine_report  # noqa: E402
from serving.engine import GenerationRequest, SamplingParams, decode, generate, serving_weights  # noqa: E402
from serving.engine.packed import PackedLinear, layout  # noqa: E402
from serving.engine.prepare import decoder_for  # noqa: E402

PROMPT_TOKENS = 32
NEW_TOKENS = 64
BATCHES = (1, 8, 32)


def imitate_avx2() -> None:
    """With --avx2 on the command line: run this script again as an AVX2-only CPU would
    (AVX2_ENV must be set before torch starts, so the process is replaced)."""
    if "--avx2" in sys.argv and any(os.environ.get(k) != v for k, v in AVX2_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ENV})


def roofline(tok_s: float, token_bytes: int, read_gb_s: float) -> dict[str, Any]:
    """Batch-1 tok/s against its limit here: every base weight read once a token."""
    limit = read_gb_s * 1e9 / token_bytes
    return {
        "token_mb": round(token_bytes / 1e6, 1),
        "limit_tok_s": round(limit, 1),
        "of_limit": round(tok_s / limit, 3),
    }


def requests(pool: ExpertPool, rows: int) -> list[GenerationRequest]:
    """`rows` distinct prompts of PROMPT_TOKENS tokens, experts round-robin, exactly NEW_TOKENS."""
    names = list(pool.adapters)
    words = ["the", "patient", "licence", "module", "kernel", "scripture", "congress", "study", "court"]
    out = []
    for i in range(rows):
        text = " ".join(words[(i + k) % len(words)] for k in range(60))
        ids = tuple(pool.tokenizer(text).input_ids[:PROMPT_TOKENS])
        params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
        out.append(GenerationRequest(ids, {names[i % len(names)]: 1.0}, params))
    return out


def throughput(pool: ExpertPool, rounds: int, sizes: Sequence[int] = BATCHES) -> dict[str, Any]:
    """tok/s of `generate` at each batch size (`generate` returns text: the device has finished),
    medians over rounds, the sizes alternating within each."""
    batches = {b: requests(pool, b) for b in sizes}
    generate(pool, batches[1])  # warm-up (the decoder is built on first use)
    samples: dict[int, list[float]] = defaultdict(list)
    for _ in range(rounds):
        for b, reqs in batches.items():
            t0 = time.perf_counter()
            generate(pool, reqs)
            samples[b].append(b * NEW_TOKENS / (time.perf_counter() - t0))
    return {
        str(b): {"tok_s": round(statistics.median(s), 1), "samples": [round(x, 1) for x in s]}
        for b, s in samples.items()
    }


@contextmanager
def timed(owner: Any, attr: str, into: list[float]) -> Iterator[None]:
    """Wrap owner.attr so each call adds its wall time to into[0]."""
    original: Callable[..., Any] = getattr(owner, attr)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            into[0] += time.perf_counter() - t0

    setattr(owner, attr, wrapper)
    try:
        yield
    finally:
        setattr(owner, attr, original)


def breakdown(pool: ExpertPool, rounds: int) -> dict[str, Any]:
    """Per batch-1 token (prefill excluded): matmul of the base weights, LoRA, rest of the forward,
    engine; and this thread's CPU time (one torch thread: all of it). Medians over rounds; the timers
    add ~0.1 us per call (~200 calls per token)."""
    (request,) = requests(pool, 1)
    parts: dict[str, list[float]] = defaultdict(list)
    for _ in range(rounds):
        linear, lora, forward = [0.0], [0.0], [0.0]
        with (
            timed(decoder, "linear", linear),
            timed(decoder.FastBatch, "_lora", lora),
            timed(decoder.FastBatch, "step", forward),
        ):
            steps = decode(pool, [request])
            next(steps)  # the prefill and the first token
            linear[0] = lora[0] = forward[0] = 0.0
            t0, cpu0 = time.perf_counter(), time.thread_time()
            tokens = sum(1 for _ in steps)
            total, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
        ms = 1000 / tokens
        parts["total_ms"].append(total * ms)
        parts["cpu_ms"].append(cpu * ms)  # this thread on a CPU: below total_ms when it waited for one
        parts["matmul_ms"].append(linear[0] * ms)
        parts["lora_ms"].append(lora[0] * ms)
        parts["forward_rest_ms"].append((forward[0] - linear[0] - lora[0]) * ms)
        parts["engine_ms"].append((total - forward[0]) * ms)
    return {k: round(statistics.median(v), 2) for k, v in parts.items()}


def profile(pool: ExpertPool, rows: int = 20) -> str:
    """torch.profiler's top ops (self CPU time) over one batch-1 decode."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    reqs = requests(pool, 1)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(pool, reqs)
    return str(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="repetitions (medians are reported)")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top ops")
    parser.add_argument(
        "--avx2", action="store_true", help="imitate an AVX2-only CPU (bandwidth not imitated)"
    )
    parser.add_argument("--out", default=None, help="JSON output (default artifacts/bench/decode.json)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. serve.pool.torch_threads=1")
    args = parser.parse_args()
    imitate_avx2()
    app = compose(args.overrides)
    torch.set_num_threads(app.serve.pool.torch_threads)
    pool = ExpertPool.load(app, device="cpu", strict=False)  # every expert with a trained adapter
    if not pool.adapters:
        raise SystemExit("no trained adapters in artifacts/experts/: run `moe train expert=...` first")
    serving_weights(pool, app.serve.pool.base_weights)
    fast = decoder_for(pool)
    result: dict[str, Any] = {
        "machine": machine_report(),  # the bandwidth at the pool's threads (set above)
        "base_model": app.base_model.name,
        "experts": list(pool.adapters),
        "dtype": str(pool.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "base_weights": app.serve.pool.base_weights,
        "layers_packed": fast.layers[0].qkv.kind
        if fast and isinstance(fast.layers[0].qkv, PackedLinear)
        else None,
        "layers": layout(pool.model),
        "single_row_mv": fast.mv if fast else None,
        "torch": torch.__version__,
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": NEW_TOKENS,
        "rounds": args.rounds,
        "loadavg_at_start": os.getloadavg(),
    }
    result["throughput"] = throughput(pool, args.rounds)
    m = result["machine"]
    print(
        f"{m['cpu']} ({m['cpu_kind']}, capped to AVX2: {m['capped_to_avx2']}; flags {m['cpu_flags']}); "
        f"{m['read_gb_s']} GB/s read on {m['torch_threads']} threads",
        flush=True,
    )
    print(
        f"{result['dtype']} pool, base weights {result['base_weights']}: layers {result['layers']}",
        flush=True,
    )
    for b, r in result["throughput"].items():
        print(f"batch {b}: {r['tok_s']} tok/s (samples {r['samples']})", flush=True)
    if fast:
        result["roofline"] = roofline(
            result["throughput"]["1"]["tok_s"], fast.token_bytes(), float(m["read_gb_s"])
        )
        r = result["roofline"]
        print(
            f"batch 1: {r['of_limit']:.0%} of the roofline ({r['token_mb']} MB a token -> {r['limit_tok_s']} tok/s)",
            flush=True,
        )
    result["batch1_per_token"] = breakdown(pool, args.rounds)
    print("batch-1 token:", result["batch1_per_token"], flush=True)
    if args.profile:
        print(profile(pool))
    result["loadavg_at_end"] = os.getloadavg()
    out = Path(args.out or app.paths.artifacts_dir / "bench" / "decode.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"load average {result['loadavg_at_start']} -> {result['loadavg_at_end']}; written to {out}")


if __name__ == "__main__":
    main()

"""Our engine on a CUDA GPU, in process (no Ray, no HTTP): does it decode right, and how fast.

    python3 benchmarks/gpu_engine_check.py [--rounds 3] [--batches 1,8,64] [paths.artifacts=...]

The GPU half of benchmarks/gpu_device_check.sh (which sets up a lent machine with no network);
any CUDA machine with the project installed runs it as it is. On the trained experts in
artifacts/experts/ (each adapter loaded once under its own name):
1. Correctness, greedy (up to 48 new tokens, one prompt per expert):
   - cuda fp32 against the same engine on this machine's CPU in fp32 (the path CI tests);
   - cuda fp32 against transformers + peft's own `generate` on cuda (an independent reference);
   - a mixed batch (one row per expert) against each row decoded alone, on cuda in the serving
     dtype (bf16): the LoRA of each row must be its own expert's.
   Reported as how many of the sequences are identical and where the first one parts; reduced
   precision may part on a near tie, so these are figures to read, not asserts.
2. Speed, in the serving dtype (bf16 on a GPU): `serving.engine.generate` at each batch size
   (32-token prompts, exactly 64 new tokens, rows round-robin over the experts), medians over
   rounds; batch 1 as a share of the roofline (the GPU's measured read bandwidth over the bytes of
   base weights a token reads, `Decoder.token_bytes`), and the GPU memory the pool holds.
Saves artifacts/bench/gpu_engine.json and prints one line per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_bench import requests, roofline, throughput  # noqa: E402

from experts.adapters import ExpertPool  # noqa: E402
from experts.config import compose  # noqa: E402
from serving.engine import GenerationRequest, SamplingParams, generate, serving_weights  # noqa: E402
from serving.engine.prepare import decoder_for  # noqa: E402

CHECK_TOKENS = 48
PROMPTS = [
    "What does the licence say about redistribution of modified copies?",
    "Summarise the main finding of the clinical trial in one sentence.",
    "How do I list the files in a directory, sorted by size?",
    "Which psalm begins with the words 'The Lord is my shepherd'?",
    "What did the president say about the economy in his address?",
    "How do I open a file for reading in Python and iterate over its lines?",
]


def read_gb_s(device: str) -> float:
    """Torch summing a 2 GiB bf16 tensor on the GPU: median of 5 after a warm-up (on a CPU:
    `experts.hardware.machine_report`'s figure)."""
    if device != "cuda":
        from experts.hardware import machine_report

        return float(machine_report()["read_gb_s"])  # type: ignore[arg-type]
    x = torch.ones(2**30, dtype=torch.bfloat16, device="cuda")
    times = []
    for _ in range(6):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        x.sum()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    size = x.numel() * x.element_size()
    del x
    torch.cuda.empty_cache()
    return round(size / statistics.median(times[1:]) / 1e9, 1)


def check_requests(pool: ExpertPool) -> list[GenerationRequest]:
    """One prompt per expert, greedy, up to CHECK_TOKENS new tokens or the end of the answer."""
    names = list(pool.adapters)
    params = SamplingParams(max_tokens=CHECK_TOKENS)  # to the end of the answer, as served
    return [
        GenerationRequest(tuple(pool.tokenizer(PROMPTS[i % len(PROMPTS)]).input_ids), {name: 1.0}, params)
        for i, name in enumerate(names)
    ]


def texts(pool: ExpertPool, reqs: list[GenerationRequest]) -> list[str]:
    out = []
    for r in generate(pool, reqs):
        if isinstance(r, Exception):
            raise r
        out.append(r[0])
    return out


def agreement(a: list[str], b: list[str]) -> dict[str, Any]:
    """How many sequences are identical; for the others, the character where they first part."""
    parts = []
    for x, y in zip(a, b, strict=True):
        if x != y:
            parts.append(
                next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))
            )
    return {"identical": len(a) - len(parts), "of": len(a), "first_difference_at_chars": parts}


def peft_reference(pool: ExpertPool, reqs: list[GenerationRequest]) -> list[str]:
    """transformers + peft `generate`, greedy, each request alone under its adapter."""
    out = []
    for r in reqs:
        (name,) = r.experts
        ids = torch.tensor([r.prompt_ids], device=pool.device)
        with torch.inference_mode():
            got = pool.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                adapter_names=[pool.peft_names[name]],
                max_new_tokens=CHECK_TOKENS,
                do_sample=False,
                pad_token_id=pool.tokenizer.eos_token_id,
            )
        out.append(pool.tokenizer.decode(got[0, ids.shape[1] :], skip_special_tokens=True))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="repetitions of each batch size (medians)")
    parser.add_argument("--batches", default="1,8,64", help="batch sizes, comma-separated")
    parser.add_argument(
        "--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the same steps on the CPU (its twin)"
    )
    parser.add_argument("--out", default=None, help="JSON output (default artifacts/bench/gpu_engine.json)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. paths.artifacts=...")
    args = parser.parse_args()
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch: this check needs a GPU (or --device cpu)")
    app = compose(args.overrides)
    torch.manual_seed(0)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "torch": torch.__version__,
        "read_gb_s": read_gb_s(dev),
    }
    import peft
    import transformers

    result["transformers"], result["peft"] = transformers.__version__, peft.__version__
    print(
        f"{result['device']}: {result['read_gb_s']} GB/s read; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, peft {peft.__version__}",
        flush=True,
    )

    cpu32 = ExpertPool.load(app, device="cpu", precision="fp32", strict=False)
    if not cpu32.adapters:
        raise SystemExit("no trained adapters in artifacts/experts/: run `moe train expert=...` first")
    reqs = check_requests(cpu32)
    result["experts"] = list(cpu32.adapters)
    t0 = time.perf_counter()
    on_cpu = texts(cpu32, reqs)
    result["cpu_fp32_seconds"] = round(time.perf_counter() - t0, 1)
    del cpu32

    gpu32 = ExpertPool.load(app, device=dev, precision="fp32", strict=False)
    result["fast_decoder_on_cuda"] = decoder_for(gpu32) is not None
    on_gpu = texts(gpu32, reqs)
    result["cuda_fp32_vs_cpu_fp32"] = agreement(on_gpu, on_cpu)
    try:
        result["cuda_fp32_vs_peft_generate"] = agreement(on_gpu, peft_reference(gpu32, reqs))
    except Exception as exc:  # the reference is a second opinion: report why it could not run
        result["cuda_fp32_vs_peft_generate"] = {"error": f"{type(exc).__name__}: {exc}"}
    result["sample"] = {"expert": reqs[0].experts, "cuda_fp32": on_gpu[0], "cpu_fp32": on_cpu[0]}
    del gpu32
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for key in ("cuda_fp32_vs_cpu_fp32", "cuda_fp32_vs_peft_generate"):
        print(f"{key}: {result[key]}", flush=True)

    pool = ExpertPool.load(app, device=dev, strict=False)  # the serving dtype (bf16 on a GPU)
    serving_weights(pool, app.serve.pool.base_weights)
    result["dtype"] = str(pool.dtype).removeprefix("torch.")
    alone = [texts(pool, [r])[0] for r in reqs]
    result["mixed_batch_vs_alone"] = agreement(texts(pool, reqs), alone)
    print(f"mixed batch vs alone ({result['dtype']}): {result['mixed_batch_vs_alone']}", flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    for b in batches:
        generate(pool, requests(pool, b))  # warm-up: CUDA's kernels for each shape
    result["throughput"] = throughput(pool, args.rounds, batches)
    if dev == "cuda":
        result["gpu_memory_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    for b, r in result["throughput"].items():
        print(f"batch {b}: {r['tok_s']} tok/s (samples {r['samples']})", flush=True)
    fast = decoder_for(pool)
    if fast is not None and "1" in result["throughput"]:
        result["roofline"] = roofline(
            result["throughput"]["1"]["tok_s"], fast.token_bytes(), result["read_gb_s"]
        )
        r = result["roofline"]
        print(
            f"batch 1: {r['of_limit']:.1%} of the roofline ({r['token_mb']} MB a token -> {r['limit_tok_s']} tok/s)"
        )
    print(f"GPU memory peak: {result.get('gpu_memory_peak_mib')} MiB")
    out = Path(args.out or app.paths.artifacts_dir / "bench" / "gpu_engine.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()

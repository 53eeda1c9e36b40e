"""The CPU kernels batch-1 decoding leans on, timed on this machine (no model needed).

    .venv/bin/python benchmarks/kernels_bench.py [--threads 2] [--repeats 20] [--avx2]

- Single-row matmuls over one SmolLM2-135M token's worth of distinct weights (30 layers of fused
  qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536, and lm_head 49152x576: 269 MB in bf16):
  `torch.mv` and F.linear in bf16, oneDNN-packed bf16 (where oneDNN can run bf16), `torch.mv` in
  fp16, F.linear in fp32 and bf16 storage with fp32 compute (`serving.engine.packed.bf16_linear`, what an
  fp32 pool serves without native bf16), in GB/s read.
- Decode-step attention (one new column, 9 heads over 3 KV heads, 64 dims, bf16 cache): torch's
  SDPA against `serving.engine.decoder.attend`, in µs a layer, for several batch sizes and cache lengths.
Which single-row kernel wins differs between CPUs (docs/benchmarks.md); the engine times its own
choice at load. `--avx2` runs it as an AVX2-only CPU would (decode_bench.imitate_avx2; the memory
bandwidth is this machine's), and the CPU flags and read bandwidth are saved beside the figures.
Saves artifacts/bench/kernels.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from decode_bench import imitate_avx2  # benchmarks/ is on sys.path

from experts.hardware import machine_report
from serving.engine.decoder import attend
from serving.engine.packed import bf16_linear

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


def median_s(call: Callable[[], object], repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def single_rows(repeats: int) -> dict[str, float]:
    bf16 = [torch.randn(s).to(torch.bfloat16) for s in SHAPES]
    x = {k: torch.randn(k).to(torch.bfloat16) for k in (576, 1536)}
    nbytes = sum(w.numel() * 2 for w in bf16)
    fp16 = [w.to(torch.float16) for w in bf16]
    x16 = {k: v.to(torch.float16) for k, v in x.items()}
    fp32 = [w.float() for w in bf16]
    x32 = {k: v.float() for k, v in x.items()}
    calls: dict[str, tuple[Callable[[], object], int]] = {
        "bf16 torch.mv": (lambda: [torch.mv(w, x[w.shape[1]]) for w in bf16], nbytes),
        "bf16 F.linear": (lambda: [F.linear(x[w.shape[1]][None], w) for w in bf16], nbytes),
        "fp16 torch.mv": (lambda: [torch.mv(w, x16[w.shape[1]]) for w in fp16], nbytes),
        "fp32 F.linear": (lambda: [F.linear(x32[w.shape[1]][None], w) for w in fp32], 2 * nbytes),
        "bf16 storage, fp32 compute": (lambda: [bf16_linear(x32[w.shape[1]][None], w) for w in bf16], nbytes),
    }
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():  # needs AVX512 or AVX-NE-CONVERT
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in bf16]
        calls["bf16 oneDNN-packed"] = (
            lambda: [
                torch.ops.mkldnn._linear_pointwise(x[w.shape[1]][None], w, None, "none", [], "")
                for w in packed
            ],
            nbytes,
        )
    return {name: round(size / median_s(call, repeats) / 1e9, 1) for name, (call, size) in calls.items()}


def attention(repeats: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for rows in (1, 8, 32):
            for columns in (40, 96, 300):
                q = torch.randn(rows, 9, 1, 64).to(torch.bfloat16)
                k, v = (torch.randn(rows, 3, columns, 64).to(torch.bfloat16) for _ in range(2))
                allowed = torch.ones(rows, 1, 1, columns, dtype=torch.bool)
                args = (q, k, v, allowed)
                sdpa = median_s(
                    lambda a=args: F.scaled_dot_product_attention(*a[:3], attn_mask=a[3], enable_gqa=True),
                    repeats * 10,
                )
                ours = median_s(lambda a=args: attend(*a), repeats * 10)
                out[f"{rows}x{columns}"] = {
                    "sdpa_us": round(sdpa * 1e6, 1),
                    "attend_us": round(ours * 1e6, 1),
                }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--avx2", action="store_true", help="imitate an AVX2-only CPU (bandwidth not imitated)"
    )
    parser.add_argument("--out", default="artifacts/bench/kernels.json")
    args = parser.parse_args()
    imitate_avx2()
    torch.set_num_threads(args.threads)
    result = {
        "machine": machine_report(),
        "threads": args.threads,
        "single_row_gb_s": single_rows(args.repeats),
        "attention": attention(args.repeats),
    }
    m = result["machine"]
    print(f"{m['cpu_kind']} (capped to AVX2: {m['capped_to_avx2']}), read {m['read_gb_s']} GB/s")
    for name, gbs in result["single_row_gb_s"].items():
        print(f"{name}: {gbs} GB/s")
    print("| rows x cached columns | SDPA µs | attend µs |\n|---|---|---|")
    for key, row in result["attention"].items():
        print(f"| {key} | {row['sdpa_us']} | {row['attend_us']} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()

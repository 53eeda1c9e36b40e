"""The base weights' formats side by side (`serve.pool.base_weights`): speed and what they change.

    .venv/bin/python benchmarks/base_weights_bench.py [--rounds 5] [--formats plain,onednn,int4] [--avx2] [overrides]

One pool per format in this process (the real base model on the CPU in the dtype the pool picks
here, bf16 with native bf16 and fp32 without; the trained experts in artifacts/experts/). The
default formats: plain, onednn and int4 for a bf16 pool; plain (fp32), bf16 storage and int4 for
an fp32 one. Batches of 1, 8 and 32 decoded round-robin over the formats within each
round (the machine's speed drifts; only same-round ratios count), medians over the rounds:
- tok/s of `serving.engine.generate` (32-token prompts, exactly 64 new tokens, greedy) and the
  prefill time of 32 such prompts;
- teacher-forced perplexity of each format through the Hugging Face path, on the same text
  (`--text`, default a licence text Debian ships), and how often its greedy next token differs
  from plain's: the packed formats must not change the model;
- batch 1 as a share of its roofline: the read bandwidth measured here over the bytes of base
  weights a token reads in that format (`Decoder.token_bytes`), beside the CPU's flags.
`--avx2` runs it as an AVX2-only CPU would (decode_bench.imitate_avx2; bandwidth not imitated).
Saves artifacts/bench/base_weights.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from decode_bench import NEW_TOKENS, imitate_avx2, requests, roofline  # noqa: E402  (benchmarks/ is on sys.path)
from serve_bench import pool_bytes  # noqa: E402

from experts.adapters import ExpertPool  # noqa: E402
from experts.config import compose  # noqa: E402
from experts.hardware import machine_report  # noqa: E402
from serving.engine import generate, serving_weights  # noqa: E402
from serving.engine.packed import layout  # noqa: E402
from serving.engine.prepare import decoder_for  # noqa: E402

BATCHES = (1, 8, 32)
TEXTS = ("/usr/share/common-licenses/GPL-3", "README.md")


def pool_for(app: Any, fmt: str) -> ExpertPool:
    pool = ExpertPool.load(app, device="cpu", strict=False)
    serving_weights(pool, fmt)
    return pool


def quality(pool: ExpertPool, ids: torch.Tensor, window: int = 512) -> tuple[float, torch.Tensor]:
    """Perplexity of the base model (no adapter) on ids [1, N], and its greedy picks."""
    nll, count, picks = 0.0, 0, []
    with torch.inference_mode():
        for start in range(0, ids.shape[1] - 1, window):
            chunk = ids[:, start : start + window + 1]
            if chunk.shape[1] < 2:
                break
            mask = torch.ones_like(chunk[:, :-1])
            logits = pool.forward(chunk[:, :-1], mask, ["base"]).logits.float()
            logp = torch.log_softmax(logits, -1)
            nll -= logp.gather(-1, chunk[:, 1:, None]).sum().item()
            count += chunk.shape[1] - 1
            picks.append(logits.argmax(-1)[0])
    return math.exp(nll / count), torch.cat(picks)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--formats", default=None, help="default: by the pool's dtype (above)")
    parser.add_argument(
        "--avx2", action="store_true", help="imitate an AVX2-only CPU (bandwidth not imitated)"
    )
    parser.add_argument("--text", default=None, help="text file for the perplexity check")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of it to score")
    parser.add_argument("--out", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    imitate_avx2()
    app = compose(args.overrides)
    torch.set_num_threads(app.serve.pool.torch_threads)
    machine = machine_report()
    print(machine, flush=True)
    fp32 = ExpertPool.load(app, names=[], device="cpu").dtype == torch.float32
    formats = (args.formats or ("plain,bf16,int4" if fp32 else "plain,onednn,int4")).split(",")
    pools = {f: pool_for(app, f) for f in formats}
    first = pools[formats[0]]
    if not first.adapters:
        raise SystemExit("no trained adapters in artifacts/experts/: run `moe train expert=...` first")
    batches = {b: requests(first, b) for b in BATCHES}
    for pool in pools.values():
        generate(pool, batches[1])  # warm-up: decoders built, kernels primed
    speed: dict[str, dict[int, list[float]]] = {f: defaultdict(list) for f in formats}
    prefill: dict[str, list[float]] = defaultdict(list)
    for r in range(args.rounds):
        for b, reqs in batches.items():
            for f in formats:
                t0 = time.perf_counter()
                generate(pools[f], reqs)
                speed[f][b].append(b * NEW_TOKENS / (time.perf_counter() - t0))
        for f in formats:
            short = [replace(q, params=replace(q.params, max_tokens=1)) for q in batches[32]]
            t0 = time.perf_counter()
            generate(pools[f], short)
            prefill[f].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds}", flush=True)
    path = Path(args.text) if args.text else next(Path(t) for t in TEXTS if Path(t).exists())
    ids = first.tokenizer(path.read_text(errors="ignore"), return_tensors="pt").input_ids[:, : args.tokens]
    scored = {f: quality(pools[f], ids) for f in formats}
    reference = scored.get("plain", scored[formats[0]])[1]
    result: dict[str, Any] = {
        "machine": machine,
        "dtype": str(first.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "text": str(path),
        "tokens_scored": int(ids.shape[1]),
        "loadavg": os.getloadavg(),
        "formats": {},
    }
    print(
        "| base weights | layers | batch 1 tok/s | batch 8 | batch 32 | prefill 32x32 s | MiB "
        "| MB a token | batch 1 of roofline | perplexity | greedy picks != plain |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for f in formats:
        row = {
            "layers": layout(pools[f].model),
            "tok_s": {str(b): round(statistics.median(v), 1) for b, v in speed[f].items()},
            "samples": {str(b): [round(x, 1) for x in v] for b, v in speed[f].items()},
            "prefill_s": round(statistics.median(prefill[f]), 3),
            "base_mib": round(pool_bytes(pools[f], lora=False) / 2**20, 1),
            "perplexity": round(scored[f][0], 3),
            "greedy_differs": round(float((scored[f][1] != reference).float().mean()), 4),
        }
        fast = decoder_for(pools[f])
        if fast is not None:
            row["roofline"] = roofline(row["tok_s"]["1"], fast.token_bytes(), float(machine["read_gb_s"]))
        result["formats"][f] = row
        t = row["tok_s"]
        print(
            f"| {f} | {row['layers']} | {t['1']} | {t['8']} | {t['32']} | {row['prefill_s']} | {row['base_mib']} "
            f"| {row.get('roofline', {}).get('token_mb')} | {row.get('roofline', {}).get('of_limit', 0):.0%} "
            f"| {row['perplexity']} | {row['greedy_differs']:.2%} |"
        )
    out = Path(args.out or app.paths.artifacts_dir / "bench" / "base_weights.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()

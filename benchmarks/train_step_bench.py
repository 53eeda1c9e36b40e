"""Seconds per LoRA training step, fp32 vs bf16 autocast, side by side in one run (median of repeats).

    .venv/bin/python benchmarks/train_step_bench.py [expert=python_docs] [train.batch_size=8] ...
    env ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 .venv/bin/python ...
        (a CPU without native bf16, imitated: experts.hardware.AVX2_ENV; bandwidth is not imitated)

Saves artifacts/bench/train_step.json. Uses the expert's real corpus and the configured base model.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from experts.base_model import load_base_model, load_tokenizer
from experts.config import compose
from experts.hardware import machine_report
from experts.train_data import domain_blocks


def main(overrides: list[str]) -> dict:
    from peft import LoraConfig, get_peft_model

    app = compose(["expert=python_docs", *overrides])
    assert app.expert is not None
    t, lcfg = app.train, app.lora
    tok = load_tokenizer(app.base_model, app.paths)
    blocks = domain_blocks(app.expert.name, app, tok, "train", t.batch_size * 6)
    model = get_peft_model(
        load_base_model(app.base_model, app.paths),
        LoraConfig(
            r=lcfg.r,
            lora_alpha=lcfg.alpha,
            lora_dropout=lcfg.dropout,
            target_modules=list(lcfg.target_modules),
            task_type="CAUSAL_LM",
        ),
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr)
    result: dict = {
        "machine": machine_report(),  # CPU kind, flags and read bandwidth beside every figure
        "threads": torch.get_num_threads(),
        "batch": f"{t.batch_size}x{t.seq_len}",
        "lora_r": lcfg.r,
        "targets": list(lcfg.target_modules),
    }
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        times = []
        for i in range(4):  # the first is warm-up
            batch = blocks[(i % 6) * t.batch_size : (i % 6 + 1) * t.batch_size]
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - start)
        result[f"{name}_s_per_step"] = round(statistics.median(times[1:]), 2)
    result["bf16_speedup"] = round(result["fp32_s_per_step"] / result["bf16_s_per_step"], 2)
    out = app.paths.artifacts_dir / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_step.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

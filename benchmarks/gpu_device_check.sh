#!/usr/bin/env bash
# benchmarks/gpu_engine_check.py on a lent GPU machine with no network (the workplace's `device`
# tool), NOT RUN YET: the one try (2026-12-04) was refused, loans paused. Prepared here, run there:
#   here: .whl/ with cp312 wheels of transformers==5.23.0 tokenizers==0.23.3 peft==0.21.2 hydra-core==1.3.8
#         omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 (pip wheel) pydantic==2.14.4 pydantic_core==2.50.5
#         annotated-types==0.8.0 typing-inspection==0.4.5 dill (20 MiB); .gpu/base/ with the base's
#         config.json and tokenizer files (no weights); .gpu/art/experts/<slug>/ with trained adapters.
#   there: bash benchmarks/gpu_device_check.sh   (carry .gpu and .whl; 64 MiB in all)
# The base's weights (98 MB GGUF) do not fit one carry, so the base is SmolLM2-135M's architecture with
# random weights: the speed figures are the real model's, the greedy comparisons are between engines
# on the same weights (a near tie parts sooner on random weights than on trained ones).
export RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import transformers, peft, torch; print(transformers.__version__, peft.__version__, torch.__version__)"
python3 - <<'PY' || exit 4
import torch
from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(".gpu/base"), dtype=torch.float32)
model.save_pretrained(".gpu/base", safe_serialization=True)
PY
python3 benchmarks/gpu_engine_check.py --rounds 3 --batches 1,8,64 --out "${OUT:-artifacts/bench}/gpu_engine.json" \
    base_model.source=local +base_model.path="$PWD/.gpu/base" paths.artifacts="$PWD/.gpu/art"

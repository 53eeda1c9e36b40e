"""LoRA and optimisation settings of a training run (conf/train/<profile>.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from experts.config.validate import check


@dataclass(frozen=True)
class LoraSpec:
    """LoRA settings (peft's own names)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0  # dropout masks cost CPU time per step for no measured gain here
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:
        check(self.r > 0, f"lora.r {self.r} must be > 0")
        check(0 <= self.dropout < 1, f"lora.dropout {self.dropout} must lie in [0, 1)")
        check(len(self.target_modules) > 0, "lora.target_modules must name at least one module")


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation settings. The defaults are the `quick` profile (the demo: a few minutes per
    expert on a 2-core CPU); conf/train/<profile>.yaml changes some, an expert file may override."""

    profile: str = "quick"
    steps: int = (
        30  # `full` trains 150 (docs/benchmarks.md#experts-perplexity-at-the-full-profile-2026-12-01)
    )
    lr: float = 5.0e-4  # a short run: a higher peak rate than `full`
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 3
    seq_len: int = 256
    batch_size: int = 8  # 8 x 256 tokens per step
    grad_accum: int = 1
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast where the hardware has it
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_every: int = 15
    eval_batches: int = 4  # validation batches per evaluation
    test_batches: int = 8  # held-out test batches for the reported perplexity
    early_stopping_patience: int = 0  # evaluations without improvement before stopping (0 = off)
    save_every: int = 15  # checkpoint interval for resume
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
    # prompting ability, its reading-comprehension tasks keep it). A quarter: measured against raw
    # text alone on the six domains at this (quick) profile, lower answer loss on every domain and on
    # the everyday questions, slightly higher raw-text perplexity (docs/benchmarks.md#experts-that-answer-questions-task-table).
    instruction_ratio: float = 0.25
    task_items: int = 32  # `moe eval`: multiple-choice and answer items per domain (test split)
    # How `moe eval` picks a multiple-choice item's three wrong options: `random` (any answer of the
    # kind) or `similar` (titles: from the answers whose abstracts are nearest, so the item is not a
    # topic guess; measured barely harder on the quick demo, docs/benchmarks.md). experts/data/tasks.py.
    task_distractors: Literal["similar", "random"] = "random"
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
            check(getattr(self, key) > 0, f"train.{key} {getattr(self, key)} must be > 0")
        check(self.lr > 0, f"train.lr {self.lr} must be > 0")
        check(
            self.max_minutes is None or self.max_minutes > 0,
            f"train.max_minutes {self.max_minutes} must be > 0",
        )
        check(
            0 <= self.instruction_ratio < 1, f"train.instruction_ratio {self.instruction_ratio} not in [0, 1)"
        )
        check(self.task_items >= 1, f"train.task_items {self.task_items} must be >= 1")

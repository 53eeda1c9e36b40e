"""The learned router's config (conf/router/<pipeline>.yaml), read by `router/`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from experts.config.expert import PackageRef
from experts.config.validate import check


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
        check(self.epochs > 0, f"router.finetune.epochs {self.epochs} must be > 0")
        check(self.batch_size >= 1, f"router.finetune.batch_size {self.batch_size} must be >= 1")
        check(self.lr > 0 and self.head_lr > 0, "router.finetune.lr and head_lr must be > 0")
        check(self.max_steps is None or self.max_steps >= 1, "router.finetune.max_steps must be >= 1")
        check(self.mix is None or 0 <= self.mix <= 1, f"router.finetune.mix {self.mix} not in [0, 1]")


@dataclass(frozen=True)
class RouterSpec:
    """The learned N-way router and its decision policy."""

    pipeline: Literal["tfidf", "embed", "combined", "tuned"] = "tfidf"
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
        check(0 < self.target_accuracy <= 1, f"router.target_accuracy {self.target_accuracy} not in (0, 1]")
        check(self.feedback_weight > 0, f"router.feedback_weight {self.feedback_weight} must be > 0")
        check(self.mixture_top_k >= 1, f"router.mixture_top_k {self.mixture_top_k} must be >= 1")
        check(0 <= self.mixture_min_prob < 1, "router.mixture_min_prob must lie in [0, 1)")
        check(0 <= self.background_purify < 1, "router.background_purify must lie in [0, 1)")

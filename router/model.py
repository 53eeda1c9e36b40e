"""The router: features -> calibrated linear classifier -> decision policy.

Labels are expert slugs. An optional internal background class (general text) and, for the
embedding pipelines, a nearest-neighbour similarity floor give an out-of-domain signal; when
either fires the decision is `fallback`, never the background "expert".

Saved as `router.json` (labels, pipeline, vocabularies, policy, threshold, metrics) plus
`router.safetensors` (weights): no pickle anywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from experts.config import AppConfig
from experts.errors import ArtifactError, ConfigError
from router.calibration import softmax
from router.features import Features
from router.pipelines import check_pipeline

log = logging.getLogger(__name__)

BACKGROUND = "__background__"  # internal class of general text; never returned as an expert
Decision = Literal["routed", "mixture", "fallback", "forced"]
POLICIES = ("top1", "mixture", "fallback")


@dataclass(frozen=True)
class RoutingDecision:
    """Where one query goes.

    expert: the chosen expert (or the fallback model's name); experts: the weights of every
    model the answer mixes (one entry with 1.0 unless decision == "mixture"); confidence: the
    router's probability of its top expert; probabilities: posterior of every expert.
    """

    expert: str
    experts: dict[str, float]
    confidence: float
    decision: Decision
    probabilities: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def forced(cls, expert: str, probabilities: dict[str, float] | None = None) -> RoutingDecision:
        """The caller named the expert itself; the router's view is kept for logging."""
        probs = dict(probabilities or {})
        return cls(expert, {expert: 1.0}, float(probs.get(expert, 1.0)), "forced", probs)


class Router:
    """A trained router. Build with `router.train.fit_router`, or `Router.load(directory)`.

    Thread-safe: every method reads fixed state (the sentence encoder serialises itself).
    """

    def __init__(
        self,
        labels: Sequence[str],
        features: Features,
        coef: np.ndarray,
        intercept: np.ndarray,
        *,
        background: bool = False,
        temperature: float = 1.0,
        threshold: float = 0.0,
        policy: str = "fallback",
        fallback_model: str = "base",
        mixture_top_k: int = 3,
        mixture_min_prob: float = 0.02,
        prototypes: np.ndarray | None = None,
        min_similarity: float | None = None,
        info: dict[str, Any] | None = None,
    ):
        self.labels: list[str] = list(labels)
        self.classes = self.labels + ([BACKGROUND] if background else [])
        if coef.shape[0] != len(self.classes) or intercept.shape != (len(self.classes),):
            raise ArtifactError(
                f"router weights have {coef.shape[0]} rows but the router has classes {self.classes}"
            )
        self.features = features
        self.coef = np.asarray(coef, dtype=np.float32)
        self._coef_t = np.ascontiguousarray(self.coef.T)  # features x classes, for sparse @ dense
        self.intercept = np.asarray(intercept, dtype=np.float32)
        self.background = background
        self.temperature = float(temperature)
        self.threshold = float(threshold)
        self.policy = policy
        self.fallback_model = fallback_model
        self.mixture_top_k = mixture_top_k
        self.mixture_min_prob = mixture_min_prob
        self.prototypes = prototypes  # unit embeddings of training windows, for the distance signal
        self.min_similarity = min_similarity
        self.info: dict[str, Any] = dict(info or {})  # pipeline config, metrics, data it saw
        self._check_policy(policy)

    @property
    def pipeline(self) -> str:
        return self.features.name

    @property
    def prototypes(self) -> np.ndarray | None:
        return self._prototypes

    @prototypes.setter
    def prototypes(self, value: np.ndarray | None) -> None:
        # float32 and contiguous once, here: a per-call cast copied the whole matrix per query.
        self._prototypes = None if value is None else np.ascontiguousarray(value, dtype=np.float32)

    def nearest_similarity(self, emb: np.ndarray) -> np.ndarray:
        """Cosine similarity of each (unit) embedding to its nearest prototype.

        In torch, which keeps to the process's torch threads (one per serving replica): numpy's
        BLAS wakes its own thread pool, which made each query slower on a busy 2-core machine.
        """
        import torch

        if self._prototypes is None:
            return np.ones(len(emb), dtype=np.float32)
        with torch.inference_mode():
            sims = (
                torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
                @ torch.from_numpy(self._prototypes).T
            )
            return sims.amax(dim=1).numpy()

    # ---------------------------------------------------------------------------------------
    # Scores
    # ---------------------------------------------------------------------------------------
    def logits(self, x: Any) -> np.ndarray:
        """Uncalibrated class scores (n x classes) of a feature matrix."""
        return np.asarray(x @ self._coef_t) + self.intercept

    def _scores(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities over all classes and each text's nearest-prototype similarity."""
        texts = [str(t) for t in texts]
        x, emb = self.features.featurize(texts)
        probs = softmax(self.logits(x) / self.temperature)
        similarity = np.ones(len(texts), dtype=np.float32) if emb is None else self.nearest_similarity(emb)
        return probs, similarity

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Calibrated posterior of each expert (n x len(labels), columns in `labels` order).

        With a background class the rows sum to 1 - P(general text): the missing mass is the
        router's belief that the text belongs to no expert.
        """
        if not len(texts):
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return self._scores(texts)[0][:, : len(self.labels)]

    # ---------------------------------------------------------------------------------------
    # Decisions
    # ---------------------------------------------------------------------------------------
    def _check_policy(self, policy: str) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"unknown router policy {policy!r}; allowed: {list(POLICIES)}")

    def out_of_domain(self, probs: np.ndarray, similarity: np.ndarray) -> np.ndarray:
        """True where the background class wins or the text is far from every training window."""
        ood = np.zeros(len(probs), dtype=bool)
        if self.background:
            ood |= probs[:, -1] >= probs[:, : len(self.labels)].max(axis=1)
        if self.min_similarity is not None:
            ood |= similarity < self.min_similarity
        return ood

    def decide(self, texts: Sequence[str], policy: str | None = None) -> list[RoutingDecision]:
        """One decision per text under `policy` (default: the router's configured policy).

        top1: always the most likely expert. fallback: the fallback model when the top
        probability is below `threshold` or the text looks out of domain. mixture: the top
        `mixture_top_k` experts with posterior >= `mixture_min_prob`, weighted by their
        renormalised posterior (one such expert: routed; none, or out of domain: fallback).
        """
        policy = policy or self.policy
        self._check_policy(policy)
        if not len(texts):
            return []
        probs, similarity = self._scores(texts)
        ood = self.out_of_domain(probs, similarity)
        expert_probs = probs[:, : len(self.labels)]
        decisions = []
        for row, is_ood in zip(expert_probs, ood, strict=True):
            posterior = {label: round(float(p), 6) for label, p in zip(self.labels, row, strict=True)}
            top = int(row.argmax())
            confidence = float(row[top])
            chosen: dict[str, float] = {}
            if policy == "top1":
                chosen = {self.labels[top]: 1.0}
            elif policy == "fallback":
                if not is_ood and confidence >= self.threshold:
                    chosen = {self.labels[top]: 1.0}
            elif not is_ood:  # mixture
                chosen = self._mixture(row)
            if not chosen:
                decision = RoutingDecision(
                    self.fallback_model, {self.fallback_model: 1.0}, confidence, "fallback", posterior
                )
            else:
                kind: Decision = "mixture" if len(chosen) > 1 else "routed"
                if kind == "routed":
                    chosen = {next(iter(chosen)): 1.0}
                decision = RoutingDecision(
                    max(chosen, key=chosen.__getitem__), chosen, confidence, kind, posterior
                )
            decisions.append(decision)
        return decisions

    def _mixture(
        self, row: np.ndarray, top_k: int | None = None, min_prob: float | None = None
    ) -> dict[str, float]:
        """The top `top_k` experts with posterior >= `min_prob` (default: the router's
        `mixture_top_k` / `mixture_min_prob`), renormalised (empty when none passes)."""
        top_k = self.mixture_top_k if top_k is None else top_k
        min_prob = self.mixture_min_prob if min_prob is None else min_prob
        ranked = [i for i in np.argsort(-row)[:top_k] if row[i] >= min_prob]
        total = float(row[ranked].sum())
        return {self.labels[i]: round(float(row[i]) / total, 6) for i in ranked}

    def mixture_weights(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """The experts the `mixture` policy would mix for each text and their weights, with no
        fallback: when no second expert passes, or the text looks out of domain, the top expert
        alone (what `moe eval` compares with top-1 routing)."""
        return self.mixture_weights_of(self.predict_proba(texts))

    def mixture_weights_of(
        self, probs: np.ndarray, top_k: int | None = None, min_prob: float | None = None
    ) -> list[dict[str, float]]:
        """`mixture_weights` of posterior rows already computed (`predict_proba`'s), at the
        router's mixture settings or the ones given."""
        return [self._mixture(row, top_k, min_prob) or {self.labels[int(row.argmax())]: 1.0} for row in probs]

    # Persistence lives in router.storage (JSON + safetensors; never pickle).
    def save(self, directory: Path) -> None:
        """Write router.json + router.safetensors into `directory` (replaced atomically)."""
        from router.storage import save_router

        save_router(self, directory)

    @classmethod
    def load(
        cls,
        directory: Path,
        expected_labels: Sequence[str] | None = None,
        *,
        downloads: Path | None = None,
    ) -> Router:
        """Load a saved router (`router.storage.read_router`); refuse one trained for other experts."""
        from router.storage import read_router

        return read_router(directory, expected_labels, downloads=downloads)


def router_dir(app: AppConfig) -> Path:
    """Where `moe train-router` writes the router and everything else reads it."""
    return app.paths.router_dir


def routable_labels(app: AppConfig) -> list[str]:
    """The router's labels: every configured expert that may be routed to (not the generalist)."""
    return [e.name for e in app.experts if e.routable]


def load_router(app: AppConfig, strict: bool = True) -> Router:
    """Load the trained router, check its labels against the routable experts, apply the config's
    decision policy (policy, fallback model, mixture settings, and threshold when set).

    strict=False accepts a router trained for other experts (serving keeps routing among the
    experts it knows while a new one is being added; the caller warns)."""
    fallback = app.router.fallback_model
    if fallback != "base" and fallback not in app.expert_names():
        raise ConfigError(
            f"router.fallback_model {fallback!r} is neither 'base' nor a configured expert; "
            f"available: {['base', *sorted(app.expert_names())]}"
        )
    check_pipeline(app.router.pipeline)
    labels = routable_labels(app) if strict else None
    router = Router.load(router_dir(app), labels, downloads=app.paths.downloads_dir)
    if router.pipeline != app.router.pipeline:
        log.warning(
            "the trained router uses pipeline %r but config says %r; using the trained one "
            "(run `moe train-router router=%s` to change it)",
            router.pipeline,
            app.router.pipeline,
            app.router.pipeline,
        )
    router.policy = app.router.policy
    router.fallback_model = fallback
    router.mixture_top_k = app.router.mixture_top_k
    router.mixture_min_prob = app.router.mixture_min_prob
    if app.router.threshold is not None:
        router.threshold = app.router.threshold
    return router

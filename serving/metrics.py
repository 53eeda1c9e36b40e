"""Prometheus metrics of the endpoint (Ray Serve's metrics: exported with every replica's others).

Label values are expert slugs, the same string as everywhere else.
"""

from __future__ import annotations

import re

from ray.serve import metrics

LATENCY_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0]
CONFIDENCE_BUCKETS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]
# A failed request is labelled with the model the client asked for: any string. Ray's metric export
# takes ASCII only (anything else raised and turned the answer into a bare 500), and every new value
# is a new time series, so a label is a slug and at most MAX_LABELS distinct ones exist.
_LABEL = re.compile(r"[a-z0-9_]{1,64}")
MAX_LABELS = 256


class Metrics:
    """Created inside the ingress replica (metrics belong to the process that records them)."""

    def __init__(self) -> None:
        self._labels: set[str] = set()
        self.requests = metrics.Counter(
            "moe_requests",
            "Requests by served expert, routing decision and HTTP status.",
            tag_keys=("expert", "decision", "status"),  # type: ignore[arg-type]  # Ray types it as a 1-tuple
        )
        self.tokens = metrics.Counter(
            "moe_tokens",
            "Prompt and completion tokens by expert.",
            tag_keys=("expert", "kind"),  # type: ignore[arg-type]
        )
        self.latency = metrics.Histogram(
            "moe_request_latency_s",
            "End-to-end request latency by expert (seconds).",
            boundaries=LATENCY_BUCKETS,
            tag_keys=("expert",),
        )
        self.confidence = metrics.Histogram(
            "moe_router_confidence",
            "The router's probability of its top expert (model=auto).",
            boundaries=CONFIDENCE_BUCKETS,
        )
        self.fallbacks = metrics.Counter("moe_router_fallbacks", "model=auto requests sent to the fallback.")

    def routed(self, confidence: float, decision: str) -> None:
        self.confidence.observe(confidence)
        if decision == "fallback":
            self.fallbacks.inc()

    def label(self, value: str) -> str:
        """`value` as a label: itself when a slug (while fewer than MAX_LABELS exist), else "other"."""
        if value not in self._labels:
            if not _LABEL.fullmatch(value) or len(self._labels) >= MAX_LABELS:
                return "other"
            self._labels.add(value)
        return value

    def finished(
        self, expert: str, decision: str, status: int, seconds: float, prompt: int = 0, completion: int = 0
    ) -> None:
        expert, decision = self.label(expert), self.label(decision)
        self.requests.inc(tags={"expert": expert, "decision": decision, "status": str(status)})
        self.latency.observe(seconds, tags={"expert": expert})
        if prompt:
            self.tokens.inc(prompt, tags={"expert": expert, "kind": "prompt"})
        if completion:
            self.tokens.inc(completion, tags={"expert": expert, "kind": "completion"})

"""`moe route TEXT...` / `moe route -`: one JSON routing decision per query, one per line."""

from __future__ import annotations

import json
import sys
from typing import Any

from experts.config import AppConfig
from experts.errors import ConfigError
from router.model import load_router

# Queries are routed in batches: one encoder call per batch, not per line.
STDIN_BATCH = 64


def _queries(args: list[str]) -> list[str]:
    if args == ["-"]:
        return [line.strip() for line in sys.stdin if line.strip()]
    if "-" in args:
        raise ConfigError("`-` (read queries from stdin) must be the only argument: moe route -")
    return [a for a in args if a.strip()]


def route_command(app: AppConfig, ctx: Any) -> list[dict[str, Any]]:
    """Print {"expert", "confidence", "decision", "probabilities"} for each query, as JSON lines."""
    texts = _queries(list(ctx.args))
    if not texts:
        raise ConfigError('nothing to route; usage: moe route "query" ... or moe route - < queries.txt')
    router = load_router(app)  # a clear ArtifactError when no router is trained
    results = []
    for start in range(0, len(texts), STDIN_BATCH):
        for decision in router.decide(texts[start : start + STDIN_BATCH]):
            row = {
                "expert": decision.expert,
                "confidence": round(decision.confidence, 4),
                "decision": decision.decision,
                "probabilities": decision.probabilities,
            }
            if decision.decision == "mixture":
                row["experts"] = decision.experts
            print(json.dumps(row), flush=True)
            results.append(row)
    return results

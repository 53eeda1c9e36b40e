"""`moe propose-experts` on the real system: traffic of two themes no expert covers, plus one-off
noise and covered questions, sent through a running endpoint (`model: auto`), then the clustering
over the query log that endpoint wrote. Reports what the router left uncovered, the clusters, their
purity against the theme each question was written for, and the time the proposal step took.

    .venv/bin/python benchmarks/proposals_bench.py                       # the configured experts + router
    .venv/bin/python benchmarks/proposals_bench.py paths.artifacts=DIR   # another artifacts folder

Any further arguments are Hydra overrides. The endpoint listens on serve.port (8440 unless given)
and logs to a fresh SQLite file. Writes artifacts/bench/proposals.json and prints a summary.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from experts.config import compose
from router.encoder import load_encoder
from serving.app import running_server
from serving.trust.proposals import propose_experts
from serving.trust.querylog import QueryLog
from tests.serving.proposal_log import COVERED, NOISE, theme_questions

PER_THEME = 24
MAX_TOKENS = 8  # the answers do not matter here, only the routing decisions the log keeps


def main(overrides: list[str]) -> dict:
    db = Path(tempfile.mkdtemp(prefix="proposals_bench_")) / "queries.sqlite"
    if not any(o.startswith("serve.port=") for o in overrides):
        overrides = [*overrides, "serve.port=8440"]
    app = compose([*overrides, f"serve.log_db={db}"])
    truth = {**theme_questions(PER_THEME), **dict.fromkeys(NOISE, "noise")}
    questions = list(truth) + [q for q, _ in COVERED] * 3
    with running_server(app) as url, httpx.Client(timeout=120) as client:

        def ask(q: str) -> dict:
            body = {"model": "auto", "messages": [{"role": "user", "content": q}], "max_tokens": MAX_TOKENS}
            reply = client.post(f"{url}/chat/completions", json=body)
            reply.raise_for_status()
            return reply.json()["routing"]

        t0 = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            decisions = list(pool.map(ask, questions))
        traffic_s = time.perf_counter() - t0
    encoder = load_encoder(app.router.encoder_package, app.paths.downloads_dir)
    with QueryLog(db) as log:
        t0 = time.perf_counter()
        result = propose_experts(app, log, encoder)
        propose_s = time.perf_counter() - t0
    by_decision = Counter(d["decision"] for d in decisions[: len(truth)])
    clusters = []
    for c in result.clusters:
        counts = Counter(truth.get(result.questions[i], "covered") for i in c.members)
        theme, n = counts.most_common(1)[0]
        clusters.append(
            {
                "slug": c.slug,
                "size": c.size,
                "theme": theme,
                "purity": round(n / c.size, 3),
                "nearest_expert": c.nearest_expert,
                "nearest_distance": c.nearest_distance,
            }
        )
    uncovered = Counter(truth.get(q, "covered") for q in result.questions)
    theme_total = {t: sum(v == t for v in truth.values()) for t in ("beekeeping", "sourdough")}
    recall = {
        t: round(sum(c["size"] * c["purity"] for c in clusters if c["theme"] == t) / theme_total[t], 3)
        for t in theme_total
    }
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "overrides": overrides,
        "requests": result.requests,
        "themed_or_noise_requests": len(truth),
        "their_decisions": dict(by_decision),
        "uncovered": dict(uncovered),
        "clusters": clusters,
        "theme_recall": recall,
        "traffic_s": round(traffic_s, 1),
        "propose_s": round(propose_s, 2),
    }
    path = app.paths.artifacts_dir / "bench" / "proposals.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])

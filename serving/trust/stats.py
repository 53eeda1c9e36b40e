"""`moe stats`: per-expert volume, review outcomes, fallbacks and latency from the query log."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from serving.trust.proposals import load_summary
from serving.trust.querylog import QueryLog, open_query_log, safe_url

COLUMNS = (
    "expert",
    "requests",
    "reviewed",
    "accept_rate",
    "misroute_rate",
    "fallback_rate",
    "error_rate",
    "p50_s",
    "p95_s",
    "p99_s",
)


def _rate(num: int, den: int) -> float | None:
    return num / den if den else None


def _group(name: str, rows: list[dict[str, Any]], reviews: dict[str, dict[str, Any]]) -> dict[str, Any]:
    verdicts = [reviews[r["request_id"]]["verdict"] for r in rows if r["request_id"] in reviews]
    latencies = np.array([r["latency_s"] for r in rows if r["latency_s"] is not None], dtype=float)
    pct = np.percentile(latencies, [50, 95, 99]) if latencies.size else [None] * 3
    return {
        "expert": name,
        "requests": len(rows),
        "reviewed": len(verdicts),
        # of the reviewed requests: how many a human accepted as they were, how many went astray
        "accept_rate": _rate(verdicts.count("accept"), len(verdicts)),
        "misroute_rate": _rate(verdicts.count("misrouted"), len(verdicts)),
        # of all requests: the router found no confident expert
        "fallback_rate": _rate(sum(r["decision"] == "fallback" for r in rows), len(rows)),
        "error_rate": _rate(sum((r["status"] or "ok") != "ok" for r in rows), len(rows)),
        "p50_s": None if pct[0] is None else float(pct[0]),
        "p95_s": None if pct[1] is None else float(pct[1]),
        "p99_s": None if pct[2] is None else float(pct[2]),
    }


def compute_stats(log: QueryLog, since: float | None = None) -> list[dict[str, Any]]:
    """One row per answering expert (sorted by volume), then `all`. Rates are None without data.

    A request's expert is the one that answered it (the fallback model for fallbacks), so the
    fallback rate of `all` is the share of traffic no expert was confident about.
    """
    rows = log.requests(since=since)
    reviews = log.latest_reviews()
    by_expert: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_expert.setdefault(r["expert"] or "-", []).append(r)
    out = [_group(k, v, reviews) for k, v in sorted(by_expert.items(), key=lambda kv: (-len(kv[1]), kv[0]))]
    out.append(_group("all", rows, reviews))
    return out


def format_table(stats: list[dict[str, Any]]) -> str:
    """A plain-text table of `compute_stats` rows."""

    def cell(key: str, v: Any) -> str:
        if v is None:
            return "-"
        if key.endswith("_rate"):
            return f"{100 * v:.1f}%"
        if key.endswith("_s"):
            return f"{v:.3f}"
        return str(v)

    table = [list(COLUMNS)] + [[cell(k, row[k]) for k in COLUMNS] for row in stats]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def stats_command(app: Any, ctx: Any) -> list[dict[str, Any]]:
    """`moe stats`: print the table for the whole log."""
    with open_query_log(app) as log:
        stats = compute_stats(log)
        where = safe_url(log.url)
    print(f"query log: {where}\n")
    print(format_table(stats))
    print(f"\n{format_clusters(load_summary(app))}")
    return stats


def format_clusters(summary: dict[str, Any] | None) -> str:
    """The fallback clusters of the last `moe propose-experts` run (its proposals.json)."""
    if summary is None:
        return "fallback clusters: none yet (`moe propose-experts` groups the uncovered questions)"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(summary["created"]))
    head = (
        f"fallback clusters ({when}, `moe propose-experts`): {summary['uncovered']} of "
        f"{summary['requests']} requests uncovered, {summary['noise']} of them noise"
    )
    lines = [head]
    for c in summary["clusters"]:
        near = f"{c['nearest_expert']} ({c['nearest_distance']:.2f})" if c["nearest_expert"] else "-"
        lines.append(
            f"  {c['slug']}: {c['size']} questions, {100 * c['share']:.1f}% of traffic, nearest {near}; "
            f"{', '.join(c['top_terms'][:5])}"
        )
    return "\n".join(lines)

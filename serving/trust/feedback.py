"""Reviews become training data: `moe feedback export`.

From the latest review of each logged request:

- `correct` -> an instruction row for the expert that answered, in
  `artifacts/feedback/<slug>.jsonl`: `{"prompt", "response", "request_id", "reviewer"}` (the format
  `experts/train.py` reads with `train.include_feedback=true`);
- `misrouted` -> a router example in `artifacts/feedback/router.jsonl`:
  `{"text", "label", "request_id", "reviewer"}` (`label` = the right expert). A misrouted review
  that also carries a corrected answer adds that answer to the *right* expert's file.

Every export rewrites the files from the whole log, so running it twice gives the same files.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from experts.errors import ConfigError
from serving.trust.querylog import QueryLog, open_query_log

ROUTER_FILE = "router.jsonl"


def feedback_rows(log: QueryLog) -> tuple[dict[str, list[dict[str, str]]], list[dict[str, str]]]:
    """(expert slug -> instruction rows, router rows) from the latest review of every request."""
    experts: dict[str, list[dict[str, str]]] = defaultdict(list)
    router: list[dict[str, str]] = []
    requests = {r["request_id"]: r for r in log.requests()}
    for request_id, review in sorted(log.latest_reviews().items(), key=lambda kv: kv[1]["ts"]):
        req = requests.get(request_id)
        if req is None:
            continue
        meta = {"request_id": request_id, "reviewer": review["reviewer"]}
        if review["verdict"] == "misrouted" and review["correct_expert"]:
            router.append({"text": req["prompt"], "label": review["correct_expert"], **meta})
        target = review["correct_expert"] if review["verdict"] == "misrouted" else req["expert"]
        correction = (review.get("correction") or "").strip()
        if review["verdict"] in ("correct", "misrouted") and correction and target:
            experts[target].append({"prompt": req["prompt"], "response": correction, **meta})
    return dict(experts), router


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    staged = path.with_name(path.name + ".part")
    staged.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    staged.replace(path)  # a trainer reading the file never sees half of it


def export_feedback(log: QueryLog, out: Path, known: list[str] | None = None) -> dict[str, int]:
    """Write the feedback files into `out`; return rows per file stem (`router` included).

    Files of experts that no longer have corrections are removed, so the folder matches the log.
    Rows naming an expert outside `known` (when given) are skipped: a removed expert's data
    must not resurface.
    """
    experts, router = feedback_rows(log)
    if known is not None:
        experts = {k: v for k, v in experts.items() if k in known}
        router = [r for r in router if r["label"] in known]
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.jsonl"):
        if stale.stem not in experts and stale.name != ROUTER_FILE:
            stale.unlink()
    counts = {}
    for slug, rows in sorted(experts.items()):
        _write_jsonl(out / f"{slug}.jsonl", rows)
        counts[slug] = len(rows)
    _write_jsonl(out / ROUTER_FILE, router)
    counts["router"] = len(router)
    return counts


def feedback_command(app: Any, ctx: Any) -> dict[str, int]:
    """`moe feedback export`: corrections -> artifacts/feedback/<slug>.jsonl, misroutes -> router.jsonl."""
    args = list(ctx.args)
    if args != ["export"]:
        raise ConfigError(f"usage: moe feedback export (got {args}); the only action is 'export'")
    out = app.paths.artifacts_dir / "feedback"
    with open_query_log(app) as log:
        counts = export_feedback(log, out, known=app.expert_names())
    for name, n in counts.items():
        print(f"{name:<16} {n:>5} rows  {out / (name + '.jsonl')}")
    print(
        "train with them: moe train expert=<slug> train.include_feedback=true; router: router.include_feedback=true"
    )
    return counts

"""The task table of `moe eval` alone (no perplexity matrix, no routing report): quicker to rerun.

    .venv/bin/python benchmarks/task_bench.py paths.artifacts=artifacts train.task_items=32 [experts=[legal,politics]]
    .venv/bin/python benchmarks/task_bench.py --choices-only ...   # multiple choice only: every scoring rule, quicker

Multiple-choice accuracy and reference-answer loss per domain on items built from each test split,
and the everyday-question forgetting check (router/task_eval.py), for the base model, the generalist
(when trained), each domain's own expert, and `routed` / `mixture` when a router is trained.
Prints the tables; writes artifacts/bench/tasks.json (paths.artifacts decides where).
"""

from __future__ import annotations

import json
import sys
import time

from experts.config import compose
from router.expert_matrix import optional_router
from router.task_eval import task_matrix
from router.task_report import render_tasks


def main(argv: list[str]) -> None:
    answers = "--choices-only" not in argv
    overrides = [a for a in argv if a != "--choices-only"]
    app = compose(overrides)
    router = optional_router(app)
    start = time.perf_counter()
    report = task_matrix(app, router, answers=answers)
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["overrides"] = argv
    out = app.paths.artifacts_dir / "bench" / "tasks.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(render_tasks(report))
    print(f"{report['seconds']} s; saved {out}")


if __name__ == "__main__":
    main(sys.argv[1:])

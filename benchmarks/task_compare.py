"""Two task reports side by side, item by item: the paired difference (after - before).

    .venv/bin/python benchmarks/task_compare.py <before>/bench/tasks.json <after>/bench/tasks.json [--out diff.json]

For two trainings scored on the same items (benchmarks/task_bench.py, or the `tasks` part of
`moe eval`'s eval.json, with the same `train.task_items` and test split), e.g. raw text against raw
text + instructions: per domain and model row, the multiple-choice accuracy difference and the
answer-loss difference with 95% paired bootstrap intervals (router/task_report.py: paired_difference).
Paired intervals are much narrower than two unpaired ones that overlap.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from experts.errors import ArtifactError
from router.task_report import paired_difference, render_paired


def _tasks(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot read a task report from {path}: {exc}") from exc
    return report.get("tasks", report)  # eval.json holds it under "tasks"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("before", type=Path, help="tasks.json (or eval.json) of the first setting")
    parser.add_argument("after", type=Path, help="tasks.json (or eval.json) of the second setting")
    parser.add_argument("--out", type=Path, help="also write the differences as JSON here")
    args = parser.parse_args(argv)
    try:
        before, after = _tasks(args.before), _tasks(args.after)
        diff = paired_difference(before, after)
    except ArtifactError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render_paired(diff, before["domains"]))
    if args.out:
        args.out.write_text(
            json.dumps({"before": str(args.before), "after": str(args.after), "diff": diff}, indent=1)
        )
        print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

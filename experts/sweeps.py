"""`moe sweep-report DIR`: one table of a Hydra sweep's trials, sorted by validation perplexity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from experts.errors import MoeError


def collect_trials(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every trial directory under `sweep_dir` with its overrides and metrics (failed ones too)."""
    rows = []
    for trial in sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name)):
        overrides_file = trial / ".hydra" / "overrides.yaml"
        if not overrides_file.exists():
            continue
        overrides = yaml.safe_load(overrides_file.read_text()) or []
        metrics_file = trial / "metrics.json"
        row: dict[str, Any] = {"trial": trial.name, "overrides": " ".join(overrides)}
        if metrics_file.exists():
            m = json.loads(metrics_file.read_text())
            row.update(
                val_ppl=m["best_val_perplexity"],
                test_ppl=m["test_perplexity"]["expert"],
                base_ppl=m["test_perplexity"]["base"],
                ratio=m["test_ratio"],
                steps=m["steps"],
                seconds=m["seconds"],
            )
        else:
            row.update(val_ppl=None, error="no metrics.json (trial failed or still running)")
        rows.append(row)
    return sorted(rows, key=lambda r: (r["val_ppl"] is None, r["val_ppl"] or 0.0))


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| rank | trial | overrides | val ppl | test ppl | base ppl | expert/base | steps | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rank, r in enumerate(rows, 1):
        if r["val_ppl"] is None:
            lines.append(f"| - | {r['trial']} | {r['overrides']} | failed | | | | | |")
        else:
            lines.append(
                f"| {rank} | {r['trial']} | {r['overrides']} | {r['val_ppl']:.3f} | {r['test_ppl']:.3f} "
                f"| {r['base_ppl']:.3f} | {r['ratio']:.3f} | {r['steps']} | {r['seconds']:.0f} |"
            )
    return "\n".join(lines)


def sweep_report_command(app: Any, ctx: Any) -> None:
    if len(ctx.args) != 1:
        raise MoeError("usage: moe sweep-report DIR (a sweep directory, e.g. artifacts/sweeps/<time>)")
    sweep_dir = Path(ctx.args[0])
    if not sweep_dir.is_dir():
        raise MoeError(f"sweep directory {sweep_dir} does not exist")
    rows = collect_trials(sweep_dir)
    if not rows:
        raise MoeError(
            f"no trials in {sweep_dir} (expected numbered trial folders with .hydra/overrides.yaml)"
        )
    table = render(rows)
    (sweep_dir / "sweep_report.md").write_text(f"# Sweep {sweep_dir}\n\n{table}\n")
    (sweep_dir / "sweep_report.json").write_text(json.dumps(rows, indent=1))
    print(table)
    print(f"\nsaved {sweep_dir / 'sweep_report.md'} and sweep_report.json")

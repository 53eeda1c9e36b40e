"""`moe eval`'s task report (router/task_eval.py scores it): the markdown tables of eval.md, each
expert's task section of its model card, and the item-by-item difference of two reports
(`paired_difference`, used by benchmarks/task_compare.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from experts.config import AppConfig
from experts.errors import ArtifactError
from router.task_eval import OWN, answer_losses, interval

CARD_BEGIN, CARD_END = "<!-- moe-eval task scores -->", "<!-- /moe-eval task scores -->"


def _cell(s: dict[str, float] | None, digits: int = 2) -> str:
    return f"{s['value']:.{digits}f} [{s['lo']:.{digits}f}, {s['hi']:.{digits}f}]" if s else "-"


def _table_head(domains: Sequence[str]) -> list[str]:
    """The header rows of a model x domain markdown table."""
    return ["| model | " + " | ".join(domains) + " |", "|" + "---|" * (len(domains) + 1)]


def render_tasks(report: dict[str, Any]) -> str:
    """The task section of eval.md: accuracy and answer loss tables, the claims, forgetting."""
    domains = report["domains"]
    head = _table_head(domains)
    lines = [
        "## Multiple choice on each domain's test split (accuracy, 4 options, chance 0.25; 95% bootstrap interval)",
        "",
        *head,
    ]
    for model, row in report["choice_accuracy"].items():
        lines.append(f"| {model} | " + " | ".join(_cell(row.get(d)) for d in domains) + " |")
    lines += [
        "",
        f"Scored by `{report['choice_rule']}`; every rule on the same items (router/task_eval.py):",
        "",
    ]
    lines += ["| model | rule | " + " | ".join(domains) + " |", "|" + "---|" * (len(domains) + 2)]
    for rule, rows in report["choice_accuracy_by_rule"].items():
        for model, row in rows.items():
            cells = " | ".join(f"{row[d]:.2f}" if d in row else "-" for d in domains)
            lines.append(f"| {model} | {rule} | {cells} |")
    lines += [
        "",
        "## Reference-answer loss (nats per token, lower is better; 95% bootstrap interval)",
        "",
        *head,
    ]
    for model, row in report["answer_loss"].items():
        lines.append(f"| {model} | " + " | ".join(_cell(row.get(d), 3) for d in domains) + " |")
    wins = {
        other: [d for d, c in report["claims"].items() if c.get(f"{OWN} - {other}", {}).get("lo", 0) > 0]
        for other in ("base", "generalist")
    }
    lines += [""]
    for other, won in wins.items():
        lines.append(
            f"- own expert beats {other} on accuracy outside the paired interval: {len(won)} of {len(domains)} {won}"
        )
    lines += ["", "## Everyday questions (forgetting): answer loss and change against the base model", ""]
    lines += ["| model | nats per token | change vs base |", "|---|---|---|"]
    for model, s in report["general"].items():
        lines.append(f"| {model} | {_cell(s, 3)} | {s['change_vs_base']:+.1%} |")
    return "\n".join(lines) + "\n"


def card_section(report: dict[str, Any], name: str) -> str:
    """The task scores of one expert for its model card."""
    lines = [CARD_BEGIN, "## Task scores (`moe eval`)", ""]
    acc, loss = report["choice_accuracy"], report["answer_loss"]
    if name in report["domains"]:
        lines += ["| model | multiple-choice accuracy | answer loss (nats/token) |", "|---|---|---|"]
        for row in ("base", "generalist", OWN):
            if row in acc or row in loss:
                label = "this expert" if row == OWN else row
                lines.append(
                    f"| {label} | {_cell(acc.get(row, {}).get(name))} | {_cell(loss.get(row, {}).get(name), 3)} |"
                )
        lines.append("")
    g = report["general"].get(name)
    if g:
        lines.append(
            f"Everyday questions: answer loss {_cell(g, 3)} nats/token, {g['change_vs_base']:+.1%} against the base model."
        )
    return "\n".join([*lines, CARD_END]) + "\n"


def update_model_cards(app: AppConfig, report: dict[str, Any]) -> list[Path]:
    """Put each trained expert's task scores into its model card (replacing earlier ones). Cards of
    adapters registered from elsewhere (`adapter_path`) are left alone."""
    written = []
    for spec in app.experts:
        card = app.paths.expert_dir(spec.name) / "README.md"
        if spec.adapter_path or not card.exists():
            continue
        text = card.read_text()
        if CARD_BEGIN in text and CARD_END in text:
            text = text[: text.index(CARD_BEGIN)] + text[text.index(CARD_END) + len(CARD_END) :].lstrip("\n")
        card.write_text(text.rstrip("\n") + "\n\n" + card_section(report, spec.name))
        written.append(card)
    return written


def paired_difference(before: dict[str, Any], after: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """`after` - `before`, item by item, for two task reports on the same items (e.g. two training
    settings): per domain and row, the accuracy difference and the answer-loss difference (nats per
    token, token-weighted) with 95% paired bootstrap intervals. Raises ArtifactError when the two
    reports were not scored on the same items."""
    out: dict[str, Any] = {}
    for domain in before["domains"]:
        a, b = before.get("per_item", {}).get(domain), after.get("per_item", {}).get(domain)
        if a is None or b is None:
            raise ArtifactError(f"no per-item scores for {domain!r} in both reports (rerun the task eval)")
        for part in ("choice_items", "answer_items"):
            if a[part] != b[part]:
                raise ArtifactError(
                    f"the two reports scored different {part.split('_')[0]} items on {domain!r}: "
                    "same train.task_items, test split and seed needed"
                )
        rows = [r for r in a if r not in ("choice_items", "answer_items") and r in b]
        for row in rows:
            cell: dict[str, Any] = {}
            if a[row]["choice"]:
                diff = torch.tensor(b[row]["choice"], dtype=torch.float) - torch.tensor(a[row]["choice"])
                cell["accuracy"] = interval(diff, seed=seed)
            if a[row]["answer"]:
                (loss_a, tokens), (loss_b, tokens_b) = (
                    answer_losses(torch.tensor(r[row]["answer"])) for r in (a, b)
                )
                if not torch.equal(tokens, tokens_b):
                    raise ArtifactError(
                        f"answer tokens differ on {domain!r}: not the same tokenizer or items"
                    )
                cell["answer_loss"] = interval(loss_b - loss_a, tokens, seed=seed)
            out.setdefault(row, {})[domain] = cell
    return out


def render_paired(diff: dict[str, Any], domains: Sequence[str]) -> str:
    """The paired differences as two markdown tables (after - before)."""
    lines: list[str] = []
    for key, title, digits in (
        ("accuracy", "Multiple-choice accuracy, after - before (paired 95% interval)", 2),
        ("answer_loss", "Answer loss, after - before (nats per token; negative: better)", 3),
    ):
        lines += [f"## {title}", "", *_table_head(domains)]
        for row, cells in diff.items():
            lines.append(
                f"| {row} | " + " | ".join(_cell(cells.get(d, {}).get(key), digits) for d in domains) + " |"
            )
        lines.append("")
    return "\n".join(lines)

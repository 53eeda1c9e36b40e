"""`moe eval`: perplexity of every model on every domain, plus the router's own report.

perplexity[model][domain] for model in base, generalist, every expert, `routed` (the router's top-1
picks the adapter per block), `mixture` (the router's posterior-weighted top-k, as served, but like
`routed` without the fallback model for blocks that look out of domain) and
`mixture_context` (those experts re-weighted at every token by their likelihood of the text so far,
Branch-Train-Merge's posterior; not served yet), on each domain's held-out test split - the same
token blocks for every model. The off-diagonal shows forgetting. Then the task table
(`router.task_eval`): multiple-choice accuracy and reference-answer loss per domain on items built
from the test split, the everyday-question forgetting check, and each expert's model card updated.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from experts.adapters import BASE, ExpertPool, adapter_dir
from experts.base_model import load_tokenizer
from experts.config import AppConfig
from experts.errors import ArtifactError
from experts.evaluate import block_nll, perplexity
from experts.train_data import domain_blocks
from router.task_eval import task_matrix
from router.task_report import render_tasks, update_model_cards

log = logging.getLogger(__name__)


def perplexity_matrix(app: AppConfig, router: Any | None, progress: bool = True) -> dict[str, Any]:
    """perplexity[model][domain], plus which expert the router picked per domain's blocks."""
    domains = [e.name for e in app.experts if e.routable]
    trained = [
        e.name for e in app.experts if (adapter_dir(e, app.paths) / "adapter_model.safetensors").exists()
    ]
    missing = sorted(set(domains) - set(trained))
    if missing:
        raise ArtifactError(f"no adapter for expert(s) {missing}; run `moe train expert=all` first")
    tok = load_tokenizer(app.base_model, app.paths)
    pool = ExpertPool.load(app, trained, device=app.train.device, precision=app.train.precision)
    n_blocks = app.train.test_batches * app.train.batch_size
    batch = app.train.batch_size
    models = [BASE, *[n for n in trained if n not in domains], *domains]
    mixed_rows = ["routed", "mixture", "mixture_context"]
    result: dict[str, dict[str, float]] = {m: {} for m in [*models, *mixed_rows]}
    picks: dict[str, dict[str, int]] = {}
    # one tick per forward batch: on a CPU without bf16 one model on one domain takes a minute
    per_domain = len(models) + (2 if router is not None else 0)  # the two mixtures share one forward
    total = len(domains) * per_domain * math.ceil(n_blocks / batch)
    bar = tqdm(total=total, desc="eval perplexity", unit="batch", disable=not progress)
    for domain in domains:
        blocks = domain_blocks(domain, app, tok, "test", n_blocks)
        for model in models:
            bar.set_postfix_str(f"{model} on {domain}")

            def logits(ids: torch.Tensor, mask: torch.Tensor, rows: Any, m: str = model) -> torch.Tensor:
                return _ticked(bar, pool.forward(ids, mask, [m] * len(ids)).logits)

            nll = block_nll(logits, blocks, batch)
            result[model][domain] = round(perplexity(nll), 4)
        if router is None:
            continue
        bar.set_postfix_str(f"routed/mixtures on {domain}")
        texts = tok.batch_decode(blocks, skip_special_tokens=True)
        top1 = [d.expert for d in router.decide(texts, policy="top1")]
        mix = router.mixture_weights(texts)  # no fallback model: routed has none either
        picks[domain] = {e: top1.count(e) for e in sorted(set(top1))}
        routed = [{e: 1.0} for e in top1]

        def routed_logprobs(
            ids: torch.Tensor, mask: torch.Tensor, rows: Any, r: list[dict[str, float]] = routed
        ) -> torch.Tensor:
            return _ticked(bar, pool.mixture_logprobs(ids, mask, r[rows]))

        nll = block_nll(routed_logprobs, blocks, batch, logprobs=True)
        result["routed"][domain] = round(perplexity(nll), 4)
        for name, nll in zip(
            ("mixture", "mixture_context"), _mixture_nlls(pool, blocks, mix, batch, bar), strict=True
        ):
            result[name][domain] = round(perplexity(nll), 4)
    bar.close()
    if router is None:
        for name in mixed_rows:
            del result[name]
    for row in result.values():
        row["mean"] = round(sum(row.values()) / len(row), 4) if row else float("nan")
    return {
        "perplexity": result,
        "domains": domains,
        "routed_picks": picks,
        "blocks_per_domain": n_blocks,
        "seq_len": app.train.seq_len,
    }


def _ticked(bar: Any, out: torch.Tensor) -> torch.Tensor:
    bar.update(1)
    return out


def _mixture_nlls(
    pool: ExpertPool, blocks: torch.Tensor, components: list[dict[str, float]], batch: int, bar: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`block_nll` of the static mixture and of its context posterior, one forward per batch for both."""
    static, context = [], []
    for start in range(0, len(blocks), batch):
        ids = blocks[start : start + batch]
        mask = torch.ones_like(ids)
        exp, logits = pool.mixture_forward(ids, mask, components[start : start + batch])
        if bar is not None:
            bar.update(1)
        static.append(block_nll(lambda *_, e=exp, x=logits: e.mix(x), ids, len(ids), logprobs=True))
        context.append(
            block_nll(
                lambda *_, e=exp, x=logits, i=ids, m=mask: e.mix_context(x, i, m),
                ids,
                len(ids),
                logprobs=True,
            )
        )
    return torch.cat(static), torch.cat(context)


def summarise(ppl: dict[str, dict[str, float]], domains: list[str]) -> dict[str, Any]:
    """The claims the issue makes, checked: expert vs base and vs generalist, mixture vs routed."""
    out: dict[str, Any] = {}
    base = ppl[BASE]
    out["expert_over_base"] = {d: round(ppl[d][d] / base[d], 4) for d in domains if d in ppl}
    if "generalist" in ppl:
        out["expert_beats_generalist"] = {d: ppl[d][d] < ppl["generalist"][d] for d in domains if d in ppl}
    if "routed" in ppl and "mixture" in ppl:
        out["mixture_minus_routed_mean"] = round(ppl["mixture"]["mean"] - ppl["routed"]["mean"], 4)
    if "routed" in ppl and "mixture_context" in ppl:
        out["mixture_context_minus_routed_mean"] = round(
            ppl["mixture_context"]["mean"] - ppl["routed"]["mean"], 4
        )
    return out


def render_markdown(report: dict[str, Any]) -> str:
    ppl, domains = report["perplexity"], report["domains"]
    head = "| model | " + " | ".join(domains) + " | mean |"
    lines = [
        f"# Evaluation ({report['blocks_per_domain']} blocks x {report['seq_len']} tokens per domain)",
        "",
        "## Perplexity on each domain's held-out test split (lower is better)",
        "",
        head,
        "|" + "---|" * (len(domains) + 2),
    ]
    for model, row in ppl.items():
        cells = []
        for d in domains:
            best = min(ppl[m][d] for m in ppl if d in ppl[m])
            cells.append(f"**{row[d]:.2f}**" if row.get(d) == best else f"{row.get(d, float('nan')):.2f}")
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {row['mean']:.2f} |")
    s = report["summary"]
    lines += ["", "## Claims", "", f"- expert / base on its own domain: {s['expert_over_base']}"]
    if "expert_beats_generalist" in s:
        wins = sum(s["expert_beats_generalist"].values())
        lines.append(
            f"- expert beats generalist on its own domain: {wins} of {len(domains)} "
            f"{s['expert_beats_generalist']}"
        )
    if "mixture_minus_routed_mean" in s:
        lines.append(f"- mean perplexity, mixture minus routed: {s['mixture_minus_routed_mean']}")
    if "mixture_context_minus_routed_mean" in s:
        lines.append(
            "- mean perplexity, mixture_context (weights updated by each expert's likelihood of the "
            f"text so far; not served yet) minus routed: {s['mixture_context_minus_routed_mean']}"
        )
    if "tasks" in report:
        lines += ["", render_tasks(report["tasks"]).rstrip("\n")]
    if "routing" in report:
        r = report["routing"]
        lines += [
            "",
            "## Routing",
            "",
            "```",
            json.dumps({k: v for k, v in r.items() if not isinstance(v, list)}, indent=1, default=str)[:4000],
            "```",
        ]
    return "\n".join(lines) + "\n"


def plot_heatmap(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ppl, domains = report["perplexity"], report["domains"]
    models = list(ppl)
    # colour by perplexity relative to the base model on that domain: < 1 means better than base
    grid = torch.tensor([[ppl[m][d] / ppl[BASE][d] for d in domains] for m in models])
    fig, ax = plt.subplots(figsize=(1.3 * len(domains) + 2, 0.5 * len(models) + 1.5))
    im = ax.imshow(grid, cmap="RdYlGn_r", vmin=0.5, vmax=1.5)
    ax.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
    ax.set_yticks(range(len(models)), models)
    for i, m in enumerate(models):
        for j, d in enumerate(domains):
            ax.text(j, i, f"{ppl[m][d]:.1f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="perplexity / base perplexity")
    ax.set_title("Held-out perplexity per domain (text: perplexity)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def optional_router(app: AppConfig) -> Any | None:
    """The trained router, or None (with a note) when there is none: its rows are then skipped."""
    from router.model import load_router

    try:
        return load_router(app)
    except ArtifactError as exc:
        print(f"note: no router ({exc}); routed/mixture rows and the routing section are skipped")
        return None


def eval_command(app: AppConfig, ctx: Any) -> None:
    """`moe eval`: write artifacts/reports/eval.json, eval.md and plots."""
    out = app.paths.reports_dir
    out.mkdir(parents=True, exist_ok=True)
    router = optional_router(app)
    start = time.perf_counter()
    report = perplexity_matrix(app, router)
    report["summary"] = summarise(report["perplexity"], report["domains"])
    report["tasks"] = task_matrix(app, router)
    update_model_cards(app, report["tasks"])
    if router is not None:
        from router.metrics import routing_report

        report["routing"] = routing_report(app, router, out)
    report["seconds"] = round(time.perf_counter() - start, 1)
    (out / "eval.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "eval.md").write_text(render_markdown(report))
    plot_heatmap(report, out / "perplexity_heatmap.png")
    print(render_markdown(report))
    print(f"saved {out / 'eval.json'}, eval.md and perplexity_heatmap.png")

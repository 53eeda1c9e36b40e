"""Which mixture settings pay: `routed` against posterior-weighted mixtures of the top-k experts.

    .venv/bin/python benchmarks/mixture_bench.py train=full train.test_batches=8 paths.artifacts=artifacts/full

Needs trained experts and a router (what `moe eval` needs). Every expert scores every domain's
VALIDATION and TEST blocks once (the blocks `moe eval` uses: `train.test_batches x train.batch_size`
of `train.seq_len` tokens); the log-probability of each observed token is kept, so that any mixture
of the experts is then exact arithmetic: a static mixture's probability of a token is
sum_j w_j p_j(token), and Branch-Train-Merge's posterior (`mixture_context`) re-weights w_j by each
expert's likelihood of the block so far. The grid over `router.mixture_top_k` and
`router.mixture_min_prob` is read on validation (where the defaults were chosen) and on test, with
the mean number of experts a request would run (its cost); a paired bootstrap over blocks gives a
95% interval of mixture minus routed at the configured setting. Prints a table; writes
artifacts/bench/mixture.json. ~11 min on 2 cores for six experts.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np
import torch
from scipy.special import logsumexp
from tqdm.auto import tqdm

from experts.adapters import ExpertPool
from experts.base_model import load_tokenizer
from experts.config import compose
from experts.evaluate import observed_logprobs
from experts.train_data import domain_blocks
from router.model import Router, load_router

TOP_K = (1, 2, 3, 6)
MIN_PROB = (0.2, 0.1, 0.05, 0.02, 0.01, 0.0)
BOOTSTRAP = 2000


def token_logprobs(app: Any, router: Router, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """domain -> (router posterior over experts [blocks, E], log p_expert(token) [E, blocks, T-1])."""
    domains = router.labels
    tok = load_tokenizer(app.base_model, app.paths)
    pool = ExpertPool.load(app, domains, device=app.train.device, precision=app.train.precision)
    n, batch = app.train.test_batches * app.train.batch_size, app.train.batch_size
    out = {}
    for domain in domains:
        blocks = domain_blocks(domain, app, tok, split, n)
        prior = router.predict_proba(tok.batch_decode(blocks, skip_special_tokens=True))
        logp = np.zeros((len(domains), len(blocks), blocks.shape[1] - 1), dtype=np.float32)
        for j, expert in enumerate(tqdm(domains, desc=f"{split} {domain}")):
            with torch.inference_mode():
                picked, _ = observed_logprobs(
                    lambda ids, mask, rows, e=expert: pool.forward(ids, mask, [e] * len(ids)).logits,
                    blocks,
                    batch,
                )
            logp[j] = picked.numpy()
        out[domain] = (prior, logp)
    return out


def weights(router: Router, prior: np.ndarray, top_k: int, min_prob: float) -> np.ndarray:
    """`Router.mixture_weights` at these settings, as a [blocks, experts] matrix."""
    w = np.zeros_like(prior)
    for i, mix in enumerate(router.mixture_weights_of(prior, top_k, min_prob)):
        for label, weight in mix.items():
            w[i, router.labels.index(label)] = weight
    return w


def static_nll(logp: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per-block summed NLL of the mixture sum_j w_j p_j (logp [E, B, T], w [B, E])."""
    return -logsumexp(logp + np.log(w.T + 1e-30)[:, :, None], axis=0).sum(-1)


def context_nll(logp: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The same, each w_j re-weighted at every token by p_j(block so far) (Branch-Train-Merge)."""
    so_far = np.concatenate([np.zeros_like(logp[:, :, :1]), np.cumsum(logp, -1)[:, :, :-1]], -1)
    lw = np.log(w.T + 1e-30)[:, :, None] + so_far
    lw -= logsumexp(lw, axis=0, keepdims=True)
    return -logsumexp(logp + lw, axis=0).sum(-1)


def mean_ppl(nll: dict[str, np.ndarray], tokens: int, rows: dict[str, np.ndarray] | None = None) -> float:
    """Mean over domains of exp(mean token NLL), as `moe eval` averages its rows."""
    rows = rows or {d: np.arange(len(v)) for d, v in nll.items()}
    return float(np.mean([np.exp(nll[d][rows[d]].sum() / (len(rows[d]) * tokens)) for d in nll]))


def split_report(
    router: Router, data: dict[str, tuple[np.ndarray, np.ndarray]], top_k: int, min_prob: float
) -> dict[str, Any]:
    tokens = next(iter(data.values()))[1].shape[-1]
    routed = {d: static_nll(lp, weights(router, p, 1, 0.0)) for d, (p, lp) in data.items()}
    base = mean_ppl(routed, tokens)
    grid = []
    for k in TOP_K:
        for m in MIN_PROB if k > 1 else (0.0,):
            ws = {d: weights(router, p, k, m) for d, (p, _) in data.items()}
            ppl = mean_ppl({d: static_nll(lp, ws[d]) for d, (_, lp) in data.items()}, tokens)
            experts = float(np.mean([(w > 0).sum(1).mean() for w in ws.values()]))
            grid.append(
                {
                    "top_k": k,
                    "min_prob": m,
                    "mixture": round(ppl, 4),
                    "minus_routed": round(ppl - base, 4),
                    "experts_per_request": round(experts, 3),
                }
            )
    ws = {d: weights(router, p, top_k, min_prob) for d, (p, _) in data.items()}
    mixed = {d: static_nll(lp, ws[d]) for d, (_, lp) in data.items()}
    context = {d: context_nll(lp, ws[d]) for d, (_, lp) in data.items()}
    rng = np.random.default_rng(0)
    diffs = []
    for _ in range(BOOTSTRAP):
        rows = {d: rng.integers(0, len(v), len(v)) for d, v in routed.items()}
        diffs.append(mean_ppl(mixed, tokens, rows) - mean_ppl(routed, tokens, rows))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {
        "routed": round(base, 4),
        "configured": {
            "top_k": top_k,
            "min_prob": min_prob,
            "mixture": round(mean_ppl(mixed, tokens), 4),
            "mixture_context": round(mean_ppl(context, tokens), 4),
            "minus_routed_95ci": [round(float(low), 4), round(float(high), 4)],
            "blocks_better": int(sum((mixed[d] < routed[d] - 1e-4).sum() for d in routed)),
            "blocks_worse": int(sum((mixed[d] > routed[d] + 1e-4).sum() for d in routed)),
            "blocks": int(sum(len(v) for v in routed.values())),
        },
        "grid": grid,
    }


def main() -> None:
    app = compose(sys.argv[1:])
    started = time.perf_counter()
    router = load_router(app)
    k, m = app.router.mixture_top_k, app.router.mixture_min_prob
    result = {s: split_report(router, token_logprobs(app, router, s), k, m) for s in ("validation", "test")}
    result["seconds"] = round(time.perf_counter() - started, 1)
    out = app.paths.artifacts_dir / "bench" / "mixture.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        "| top_k | min_prob | validation: mixture - routed | experts/request | test: mixture - routed | experts/request |"
    )
    print("|---|---|---|---|---|---|")
    for v, t in zip(result["validation"]["grid"], result["test"]["grid"], strict=True):
        print(
            f"| {v['top_k']} | {v['min_prob']} | {v['minus_routed']:+.4f} | {v['experts_per_request']:.2f} "
            f"| {t['minus_routed']:+.4f} | {t['experts_per_request']:.2f} |"
        )
    for split in ("validation", "test"):
        r = result[split]
        c = r["configured"]
        print(
            f"{split}: routed {r['routed']:.4f}, mixture (top_k={k}, min_prob={m}) {c['mixture']:.4f}, "
            f"95% CI of the difference {c['minus_routed_95ci']}, mixture_context {c['mixture_context']:.4f}; "
            f"blocks better/worse {c['blocks_better']}/{c['blocks_worse']} of {c['blocks']}"
        )
    print(f"written to {out} ({result['seconds']} s)")


if __name__ == "__main__":
    main()

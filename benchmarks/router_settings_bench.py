"""Settings of the combined router side by side: each argument is one comma-separated set of
overrides, refitted on the same windows and scored on the same test windows and questions.

    .venv/bin/python benchmarks/router_settings_bench.py "" router.c=8 router.max_windows_per_expert=6000
    .venv/bin/python benchmarks/router_settings_bench.py embed_weight=3   # CombinedFeatures.EMBED_WEIGHT

MiniLM embeddings are computed once per text and reused (router.features.EmbeddingCache), so a row
after the first costs only its fit. Prints one JSON line per setting; saves
artifacts/bench/router_settings.json. Needs the corpora (`moe data expert=all`).
"""

from __future__ import annotations

import json
import sys
import time

import torch

from experts.config import compose
from experts.hardware import machine_report
from router.encoder import EmbeddingCache, load_encoder
from router.features import CombinedFeatures
from router.metrics import bench_scores, bench_sets
from router.model import routable_labels
from router.pipelines import build_features
from router.train import fit_router, router_examples

EMBED_WEIGHT = "embed_weight="  # not a config key: the combined features' class constant


def main(settings: list[list[str]]) -> list[dict]:
    started = time.perf_counter()
    app = compose(["router=combined"])
    labels = routable_labels(app)
    sets = bench_sets(app, labels)
    cached = EmbeddingCache(load_encoder(app.router.encoder_package, app.paths.downloads_dir))
    torch.set_num_threads(2)
    default_weight = CombinedFeatures.EMBED_WEIGHT
    examples: dict[tuple, tuple] = {}
    results = []
    for overrides in settings:
        weights = [float(o.removeprefix(EMBED_WEIGHT)) for o in overrides if o.startswith(EMBED_WEIGHT)]
        sub = compose(["router=combined", *[o for o in overrides if not o.startswith(EMBED_WEIGHT)]])
        spec = sub.router
        key = (spec.max_windows_per_expert, tuple(spec.window_words), spec.windows_per_doc, spec.seed)
        if key not in examples:
            examples[key] = router_examples(sub, labels)
        train, validation = examples[key]
        CombinedFeatures.EMBED_WEIGHT = weights[0] if weights else default_weight
        features = build_features("combined", spec.encoder_package, sub.paths.downloads_dir)
        features.frozen_embed().encoder = cached
        t0 = time.perf_counter()
        router, _ = fit_router(labels, train, validation, spec, features)
        row = {
            "overrides": overrides,
            "train_examples": len(train),
            **bench_scores(router, sets),
            "fit_seconds": round(time.perf_counter() - t0, 1),
            "elapsed_seconds": round(time.perf_counter() - started, 1),
        }
        print(json.dumps(row), flush=True)
        results.append(row)
    CombinedFeatures.EMBED_WEIGHT = default_weight
    out = app.paths.artifacts_dir / "bench" / "router_settings.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = machine_report()  # CPU kind, flags and read bandwidth beside every figure
    print(f"machine: {machine}")
    out.write_text(json.dumps({"machine": machine, "results": results}, indent=1) + "\n")
    print(f"saved {out}")
    return results


if __name__ == "__main__":
    main([[o for o in arg.split(",") if o] for arg in sys.argv[1:]] or [[]])

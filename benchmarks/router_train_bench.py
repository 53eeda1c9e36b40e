"""Routers trained as `moe train-router` trains them, from an empty embedding cache, then scored on
the same test windows and hand-written questions: what the demo's router costs and gives.

    .venv/bin/python benchmarks/router_train_bench.py [--avx2] router=fast router=combined [key=value ...]

Each `router=<name>` argument is one router config trained in turn, into a scratch folder under
artifacts/bench/ (the corpora read from paths.artifacts); quoted, it may carry its own overrides
("router=fast router.embed_windows_per_expert=1000"); other overrides apply to all. Scores:
top-1 accuracy on 500 TEST windows per expert of 8/16/32/64 words, and the in-domain / off-topic
questions of tests/fixtures/natural_questions.yaml under the fallback policy. `train_seconds` is
`moe train-router`'s own (windows, embedding, fitting, calibration). `--avx2` reruns the script as
an AVX2-only CPU would (kernels capped; memory bandwidth not imitated). Prints one JSON line per
router; saves artifacts/bench/router_train.json with the CPU flags and read bandwidth.
Needs the corpora (`moe data expert=all`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_bench import imitate_avx2  # noqa: E402  (benchmarks/ is on sys.path)

from experts.config import compose  # noqa: E402
from experts.hardware import machine_report  # noqa: E402
from router.metrics import bench_scores, bench_sets  # noqa: E402
from router.model import routable_labels  # noqa: E402
from router.train import train_router  # noqa: E402


def main(argv: list[str]) -> list[dict]:
    imitate_avx2()
    argv = [a for a in argv if a != "--avx2"]
    routers = [a for a in argv if a.startswith("router=")] or ["router=fast"]
    shared = [a for a in argv if not a.startswith("router=")]
    app = compose(shared)
    labels = routable_labels(app)
    sets = bench_sets(app, labels)
    scratch = app.paths.artifacts_dir / "bench" / "router_train"  # its own router and empty cache
    results = []
    for name in routers:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        (scratch / "data").symlink_to((app.paths.artifacts_dir / "data").resolve())  # the corpora, read only
        router, metrics = train_router(compose([*name.split(), *shared, f"paths.artifacts={scratch}"]))
        row = {
            "router": name,
            "pipeline": router.pipeline,
            "train_seconds": metrics["train_seconds"],
            **bench_scores(router, sets),
            "mix": metrics.get("mix"),
            "embedded_windows": metrics.get("embedded_windows"),
        }
        print(json.dumps(row), flush=True)
        results.append(row)
    machine = machine_report()  # CPU kind, flags and read bandwidth beside every figure
    print(f"machine: {machine}")
    out = app.paths.artifacts_dir / "bench" / "router_train.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    imitated = "ATEN_CPU_CAPABILITY" in os.environ
    out.write_text(
        json.dumps({"machine": machine, "imitated_avx2": imitated, "results": results}, indent=1) + "\n"
    )
    print(f"saved {out}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])

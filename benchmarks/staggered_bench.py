"""Requests that arrive one after another, not all at once, against a running endpoint: what
iteration-level batching is for (a batch that arrives joins the running one).

    .venv/bin/moe serve &                                    # the endpoint under test
    .venv/bin/python benchmarks/staggered_bench.py           # 32 requests, 0.05 s and 0.2 s apart
    .venv/bin/python benchmarks/staggered_bench.py --gaps 0.1 --repeats 3 --requests 16

Each request forces one of the experts in turn (`--models`), 64 new tokens (`ignore_eos`), greedy.
Prints throughput and latency p50 / p95 per gap and repeat; writes artifacts/bench/staggered.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import httpx

MODELS = "biomedical,legal,politics,python_docs,religion,unix_man"


def run(url: str, models: list[str], requests: int, gap_s: float, tokens: int) -> dict[str, float]:
    """Send `requests` requests `gap_s` apart, each on its own thread; wait for all."""
    done: dict[int, tuple[float, int]] = {}
    errors: list[str] = []

    def one(i: int) -> None:
        body = {
            "model": models[i % len(models)],
            "prompt": f"Request {i}: the court held that the",
            "max_tokens": tokens,
            "ignore_eos": True,
            "temperature": 0,
        }
        t0 = time.perf_counter()
        try:
            reply = httpx.post(f"{url}/completions", json=body, timeout=600)
            reply.raise_for_status()
        except httpx.HTTPError as exc:
            errors.append(f"request {i}: {exc}")
            return
        done[i] = (time.perf_counter() - t0, reply.json()["usage"]["completion_tokens"])

    threads = []
    start = time.perf_counter()
    for i in range(requests):
        thread = threading.Thread(target=one, args=(i,))
        thread.start()
        threads.append(thread)
        time.sleep(gap_s)
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit("; ".join(errors[:3]))
    wall = time.perf_counter() - start
    latency = sorted(t for t, _ in done.values())
    return {
        "gap_s": gap_s,
        "tok_s": round(sum(n for _, n in done.values()) / wall, 1),
        "latency_p50_s": round(statistics.median(latency), 2),
        "latency_p95_s": round(latency[max(0, int(0.95 * len(latency)) - 1)], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the endpoint's base URL")
    parser.add_argument("--models", default=MODELS, help="comma-separated experts, used in turn")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--gaps", type=float, nargs="+", default=[0.05, 0.2], help="seconds between requests")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--out", default="artifacts/bench/staggered.json")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    rows = []
    for gap in args.gaps:
        for repeat in range(args.repeats):
            row = run(args.url, models, args.requests, gap, args.tokens)
            rows.append(row)
            print(
                f"gap {gap} s, repeat {repeat + 1}: {row['tok_s']} tok/s, latency p50 "
                f"{row['latency_p50_s']} / p95 {row['latency_p95_s']} s",
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"requests": args.requests, "tokens": args.tokens, "runs": rows}, indent=1) + "\n"
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()

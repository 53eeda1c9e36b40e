"""Why two torch threads per replica lose on a 2-CPU machine: libgomp's throttled spinning.

    .venv/bin/python benchmarks/openmp_threads_bench.py [--threads 2]

Streams the base model's batch-1 GEMV shapes (30 layers of SmolLM2-135M + lm_head, 269 MB of bf16
weights, `torch.mv`) with `--threads` torch threads, three ways:
1. on the process's initial (main) thread, the only OpenMP team in the process;
2. on the main thread while another thread holds a second, idle OpenMP team;
3. on a second thread (how a Ray Serve replica runs torch: never on the initial thread).

libgomp counts every thread it manages (the initial thread included); once that count exceeds the
CPUs the process may use, every team's workers spin only briefly (its "throttled" spin count) before
sleeping in a futex, so each of the ~120 parallel GEMVs per token pays a wake-up. On 2 CPUs a
2-thread team started from any thread but the initial one makes 3 managed threads: 2 and 3 are as
slow as each other and little faster than one thread. Prints milliseconds per token-worth of GEMVs
(median of 9); saves artifacts/bench/openmp_threads.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate_up, down
LAYERS = 30
LM_HEAD = (49152, 576)
REPEATS = 9


def stream(threads: int) -> Callable[[], float]:
    """A function that times one pass of every weight through `torch.mv` (ms, median of REPEATS)."""
    weights = [torch.randn(n, k, dtype=torch.bfloat16) for n, k in LAYER_SHAPES * LAYERS + [LM_HEAD]]
    inputs = {k: torch.randn(k, dtype=torch.bfloat16) for k in {k for _, k in LAYER_SHAPES}}

    def timed() -> float:
        torch.set_num_threads(threads)
        for w in weights:  # warm-up
            torch.mv(w, inputs[w.shape[1]])
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            for w in weights:
                torch.mv(w, inputs[w.shape[1]])
            times.append(time.perf_counter() - start)
        return round(statistics.median(times) * 1e3, 2)

    return timed


def in_thread(fn: Callable[[], float]) -> float:
    out: list[float] = []
    worker = threading.Thread(target=lambda: out.append(fn()))
    worker.start()
    worker.join()
    return out[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--out", default="artifacts/bench/openmp_threads.json")
    args = parser.parse_args()
    timed = stream(args.threads)
    result = {"cpus": len(os.sched_getaffinity(0)), "threads": args.threads}
    result["main_thread_ms"] = timed()
    release = threading.Event()

    def hold_a_team() -> None:  # an idle second OpenMP team, alive while the main thread measures
        torch.set_num_threads(args.threads)
        torch.mv(torch.ones(4096, 576, dtype=torch.bfloat16), torch.ones(576, dtype=torch.bfloat16))
        release.wait()

    holder = threading.Thread(target=hold_a_team)
    holder.start()
    time.sleep(0.2)
    result["main_thread_second_team_alive_ms"] = timed()
    release.set()
    holder.join()
    result["second_thread_ms"] = in_thread(timed)
    result["main_thread_again_ms"] = timed()
    result["one_thread_ms"] = stream(1)()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['cpus']} CPUs, {args.threads} torch threads: ms per token of batch-1 GEMVs (269 MB bf16)")
    print(f"  main thread, one OpenMP team:          {result['main_thread_ms']}")
    print(f"  main thread, a second team alive:      {result['main_thread_second_team_alive_ms']}")
    print(f"  a second thread (as in a Ray replica): {result['second_thread_ms']}")
    print(f"  main thread again:                     {result['main_thread_again_ms']}")
    print(f"  one torch thread:                      {result['one_thread_ms']}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()

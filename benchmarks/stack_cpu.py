"""Where a token's CPU time goes: every process on the machine, per generated token, while a
running endpoint answers batch-1 requests (streamed, then not). Linux only (reads /proc).

    .venv/bin/moe serve &                                   # the endpoint under test
    .venv/bin/python benchmarks/stack_cpu.py                # 3 requests x 256 tokens each way
    .venv/bin/python benchmarks/stack_cpu.py --url http://127.0.0.1:8000/v1 --model legal

On a machine whose CPUs the engine shares with Ray, every millisecond another process spends per
token is taken from the decoder, and each wake-up can stall its OpenMP team (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import httpx

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """pid -> (command line, user + system CPU seconds so far), for every process we may read."""
    seen = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone, or not ours to read
            continue
        seen[int(entry.name)] = (cmd or entry.name, (int(fields[11]) + int(fields[12])) / TICK)
    return seen


def run(url: str, model: str, stream: bool, tokens: int, requests: int) -> dict[str, object]:
    """Send the requests one at a time; CPU milliseconds per token of each process meanwhile."""
    client = httpx.Client(timeout=600)
    before, start = cpu_seconds(), time.perf_counter()
    for i in range(requests):
        body = {
            "model": model,
            "prompt": f"Request {i}: the court held that",
            "max_tokens": tokens,
            "ignore_eos": True,
            "temperature": 0,
            "stream": stream,
        }
        if stream:
            with client.stream("POST", f"{url}/completions", json=body) as reply:
                reply.raise_for_status()
                for _ in reply.iter_lines():
                    pass
        else:
            client.post(f"{url}/completions", json=body).raise_for_status()
    wall = time.perf_counter() - start
    after, total = cpu_seconds(), tokens * requests
    per_token = {
        cmd[:70]: round((used - before[pid][1]) * 1000 / total, 2)
        for pid, (cmd, used) in after.items()
        if pid in before and used - before[pid][1] > 0.01
    }
    return {
        "stream": stream,
        "tok_s": round(total / wall, 1),
        "cpu_ms_per_token": dict(sorted(per_token.items(), key=lambda kv: -kv[1])),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the endpoint's base URL")
    parser.add_argument("--model", default="legal", help="the expert every request forces")
    parser.add_argument("--tokens", type=int, default=256, help="new tokens a request")
    parser.add_argument("--requests", type=int, default=3, help="requests each way")
    parser.add_argument("--out", default=None, help="also write the result as JSON here")
    args = parser.parse_args()
    if not Path("/proc/self/stat").exists():
        print("stack_cpu.py reads /proc: Linux only", file=sys.stderr)
        return 2
    try:
        httpx.get(f"{args.url.removesuffix('/v1')}/health", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        print(f"no endpoint at {args.url} ({exc}); start one with `moe serve`", file=sys.stderr)
        return 2
    results = [run(args.url, args.model, s, args.tokens, args.requests) for s in (True, False)]
    for r in results:
        print(f"stream={r['stream']}: {r['tok_s']} tok/s; CPU ms per token:")
        for cmd, ms in r["cpu_ms_per_token"].items():  # type: ignore[attr-defined]
            print(f"  {ms:7.2f}  {cmd}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

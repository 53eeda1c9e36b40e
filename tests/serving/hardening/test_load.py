"""A bounded burst against the real endpoint: 300 requests, 64 at a time, tiny max_tokens. Every
request gets a completion or a clean 503 with Retry-After (the pool admits 16 + 16 queued), none
hangs past its timeout (it would be lost), and the query log has exactly one row per request, "ok" for the answered."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from tests.serving.conftest import SERVED
from tests.serving.hardening.conftest import Endpoint, logged_rows

pytestmark = pytest.mark.serve

REQUESTS, CONCURRENCY, TIMEOUT_S = 300, 64, 120.0
POOL_ADMITS = 16 + 16  # serve.pool.max_ongoing_requests + max_queued_requests (conftest)


@dataclass
class InFlight:
    """The requests of a burst sent and not yet answered; `reached` is set once `at_least` are."""

    at_least: int
    live: set[int] = field(default_factory=set)
    reached: threading.Event = field(default_factory=threading.Event)

    def sent(self, i: int) -> None:
        self.live.add(i)
        if len(self.live) >= self.at_least:
            self.reached.set()


async def burst(
    endpoint: Endpoint, n: int, concurrency: int, tag: str, in_flight: InFlight | None = None
) -> list[tuple[int, httpx.Response | None]]:
    """Send `n` chat requests, `concurrency` at a time; (index, response or None when it failed).
    `in_flight` follows which are sent and not yet answered (read from another thread)."""
    models = ["auto", "base", *SERVED]
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, httpx.Response | None]:
        body = {
            "model": models[i % len(models)],
            "messages": [{"role": "user", "content": f"{tag} question {i} about the licence terms"}],
            "max_tokens": 1 + i % 3,
        }
        async with gate:
            if in_flight is not None:
                in_flight.sent(i)
            try:
                return i, await client.post("/v1/chat/completions", json=body)
            except httpx.HTTPError:  # a timeout or a dropped connection: lost
                return i, None
            finally:
                if in_flight is not None:
                    in_flight.live.discard(i)

    async with httpx.AsyncClient(
        base_url=endpoint.url, headers=endpoint.auth, timeout=TIMEOUT_S, limits=limits
    ) as client:
        return await asyncio.gather(*(one(client, i) for i in range(n)))


def classify(results: list[tuple[int, httpx.Response | None]]) -> dict[str, list]:
    """answered (200 with a completion), rejected (503 + Retry-After, OpenAI shape) and lost (else)."""
    out: dict[str, list] = {"answered": [], "rejected": [], "lost": []}
    for i, reply in results:
        if reply is not None and reply.status_code == 200 and reply.json()["choices"][0]["message"]["role"]:
            out["answered"].append(reply)
        elif (
            reply is not None
            and reply.status_code == 503
            and int(reply.headers.get("retry-after", "0")) >= 1
            and set(reply.json()["error"]) == {"message", "type", "param", "code"}
        ):
            out["rejected"].append(reply)
        else:
            out["lost"].append((i, None if reply is None else (reply.status_code, reply.text[:200])))
    return out


def test_a_burst_gets_completions_or_clean_503s_and_one_log_row_each(endpoint):
    started = time.monotonic()
    results = asyncio.run(burst(endpoint, REQUESTS, CONCURRENCY, tag="load"))
    seconds = time.monotonic() - started
    kinds = classify(results)
    answered, rejected, lost = kinds["answered"], kinds["rejected"], kinds["lost"]
    print(
        f"\nload: {REQUESTS} sent, {CONCURRENCY} concurrent: {len(answered)} answered, "
        f"{len(rejected)} rejected (503), {len(lost)} lost, in {seconds:.1f} s"
    )
    assert lost == [] and len(answered) + len(rejected) == REQUESTS
    assert len(answered) >= POOL_ADMITS  # at least the first wave the pool took in was answered
    # none waited out its timeout: that request would be lost (httpx's timeout), not answered late
    for reply in answered:
        usage = reply.json()["usage"]
        assert 1 <= usage["completion_tokens"] <= 3 and reply.headers["x-moe-expert"]

    ids = {reply.headers["x-request-id"] for reply in answered}
    rejected_ids = {reply.headers["x-request-id"] for reply in rejected}
    assert len(ids) == len(answered) and not ids & rejected_ids  # one id per request
    rows = logged_rows(endpoint, sorted(ids | rejected_ids))
    ok = {rid for rid, row in rows.items() if row["status"] == "ok"}
    assert ok == ids, f"{len(ids - ok)} answered requests without an ok row, {len(ok - ids)} ok rows too many"
    assert all(rows[rid]["status"] == "overloaded_error" for rid in rejected_ids & set(rows))

"""Faults on the real endpoint: an expert-pool replica process is killed under load. Requests in flight
fail cleanly (an OpenAI-shaped 503/500, never a hang) or succeed, Ray Serve starts a new replica, and
the endpoint answers normally again within a bounded time (printed)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import httpx
import pytest

from tests.serving.hardening.conftest import assert_openai_error
from tests.serving.hardening.test_load import TIMEOUT_S, InFlight, burst

pytestmark = pytest.mark.serve

RECOVERY_LIMIT_S = 120.0


def pool_replica_names() -> list[str]:
    """Names of the live expert-pool replica actors (Ray Serve names them after the deployment)."""
    import ray

    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and "pool_" in a["name"] and "REPLICA" in a["name"].upper()
    ]


BODY = {"model": "legal", "messages": [{"role": "user", "content": "the licensee shall"}], "max_tokens": 2}


def kill_under_load(endpoint, kill, requests: int, concurrency: int, tag: str, failed: tuple[int, ...]):
    """Start a burst, `kill()` once `concurrency` requests are in flight, and check that they were
    and that every request got an answer: 200 or one of `failed` in OpenAI's error shape. Then wait
    until a completion succeeds again. Returns the statuses of the requests in flight at the kill,
    the seconds to recovery and the first good reply."""
    results: list = []
    in_flight = InFlight(at_least=concurrency)
    load = threading.Thread(
        target=lambda: results.extend(asyncio.run(burst(endpoint, requests, concurrency, tag, in_flight)))
    )
    load.start()
    assert in_flight.reached.wait(TIMEOUT_S), "the burst never had its requests in flight"
    kill()
    at_kill = set(in_flight.live)  # sent, not answered: in the endpoint when it lost its pool
    killed = time.monotonic()
    load.join(TIMEOUT_S + 30)
    assert not load.is_alive(), "a request hung"
    assert len(at_kill) >= concurrency // 2, f"only {len(at_kill)} requests were in flight at the kill"
    statuses: dict[int, int] = {}
    for i, reply in results:
        assert reply is not None, f"request {i} got no answer (timeout or dropped connection)"
        if i in at_kill:
            statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
        if reply.status_code != 200:
            assert reply.status_code in failed, reply.text[:300]
            assert_openai_error(reply)
    assert sum(statuses.values()) == len(at_kill)
    while True:  # answering normally again: a completion from the (new) pool
        reply = endpoint.post("/v1/chat/completions", json=BODY, timeout=30)
        if reply.status_code == 200:
            return statuses, time.monotonic() - killed, reply
        assert reply.status_code in failed, reply.text[:300]
        assert_openai_error(reply)
        assert time.monotonic() - killed < RECOVERY_LIMIT_S, f"no recovery in {RECOVERY_LIMIT_S:.0f} s"
        time.sleep(0.5)


def test_killing_a_pool_replica_under_load(endpoint):
    import ray

    (victim,) = pool_replica_names()
    assert endpoint.post("/v1/chat/completions", json=BODY).status_code == 200
    statuses, recovery, reply = kill_under_load(
        endpoint,
        lambda: ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True),
        96,
        16,
        "fault",
        (500, 503),
    )
    print(f"\nfault: killed {victim}; in-flight statuses {statuses}; answering again after {recovery:.1f} s")
    assert pool_replica_names() and pool_replica_names() != [victim]
    assert reply.json()["usage"]["completion_tokens"] == 2
    assert httpx.get(f"{endpoint.url}/health", timeout=30).json()["status"] == "ok"


def test_killing_the_engine_process_under_load(endpoint):
    """The pool replica's engine process dies: its requests fail with a clean 503, the replica's
    health check fails, Ray Serve replaces the replica, and the endpoint answers again."""
    from ray import serve

    from serving.app import APP_NAME

    (victim,) = pool_replica_names()
    pool = serve.get_deployment_handle(victim.split("#")[1], app_name=APP_NAME)
    pid = pool.info.remote().result()["engine_pid"]
    statuses, recovery, _ = kill_under_load(
        endpoint, lambda: os.kill(pid, signal.SIGKILL), 64, 8, "engine", (503,)
    )
    print(f"\nfault: killed the engine process; statuses {statuses}; answering after {recovery:.1f} s")
    assert pool.info.remote().result()["engine_pid"] != pid

"""`router.policy=mixture` end to end over HTTP: a question between two domains is answered by a blend
of their adapters, with the weights the router gives it."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.serve

BETWEEN = "licence copyright warranty patient clinical dose"  # legal and biomedical words


def test_a_mixture_is_routed_and_answered_over_http(endpoint):
    route = endpoint.post("/v1/route", json={"text": BETWEEN})
    assert route.status_code == 200, route.text[:300]
    decided = route.json()
    assert decided["decision"] == "mixture" and set(decided["experts"]) == {"legal", "biomedical"}, decided
    body = {
        "model": "auto",
        "messages": [{"role": "user", "content": BETWEEN}],
        "max_tokens": 4,
        "temperature": 0,
    }
    reply = endpoint.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text[:300]
    routing = reply.json()["routing"]
    assert routing["decision"] == "mixture" and routing["experts"] == decided["experts"]
    assert (
        abs(sum(routing["experts"].values()) - 1) < 1e-3
        and reply.headers["x-moe-expert"] == routing["expert"]
    )
    assert routing["expert"] == max(routing["experts"], key=routing["experts"].__getitem__)
    assert reply.json()["usage"]["completion_tokens"] >= 1

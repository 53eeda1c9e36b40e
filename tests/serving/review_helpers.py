"""A crafted query log and a real uvicorn server for the review tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

from serving.trust.querylog import QueryLog

EXPERTS = ["biomedical", "legal", "unix_man"]
# (request_id, prompt, expert, confidence, decision, output, latency_s)
REQUESTS = [
    ("r1", "What does fork() return?", "legal", 0.31, "routed", "A licence term.", 0.40),
    ("r2", "Side effects of metformin?", "biomedical", 0.95, "routed", "Nausea, diarrhoea.", 0.20),
    ("r3", "Is GPL copyleft?", "legal", 0.55, "routed", "No.", 0.30),
    ("r4", "Tell me a joke", "base", 0.12, "fallback", "Why did the ...", 0.10),
    ("r5", "chmod 755 meaning", "unix_man", 0.88, "routed", "rwxr-xr-x", 0.50),
]


def fill_log(log: QueryLog) -> None:
    for rid, prompt, expert, conf, decision, output, latency in REQUESTS:
        log.record(
            {
                "request_id": rid,
                "prompt": prompt,
                "expert": expert,
                "experts": {expert: 1.0},
                "confidence": conf,
                "decision": decision,
                "output": output,
                "latency_s": latency,
                "prompt_tokens": 8,
                "completion_tokens": 16,
            }
        )
    assert log.flush()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_review(log: QueryLog) -> Iterator[str]:
    """The review router on a plain FastAPI app, served by uvicorn on 127.0.0.1:<free port>."""
    import uvicorn
    from fastapi import FastAPI

    from serving.trust.review import review_router

    app = FastAPI()
    app.include_router(review_router(lambda: log, EXPERTS))  # the lazy form a Ray replica uses
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = (
        time.monotonic() + 120
    )  # a hang guard, not a speed limit: uvicorn sets `started` when it listens
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(5)

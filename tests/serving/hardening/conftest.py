"""One real endpoint for the reliability and security tests (issue #10), started once for the package.

The tiny app (tiny base, three tiny adapters, a trained router) on 127.0.0.1:8311 with:
- API keys on, one from an environment variable and one from a keys file;
- a fourth configured expert, `generalist`, whose adapter file is truncated (startup must name it and
  serve the others);
- the router's mixture policy (`model: auto` may blend experts), tested end to end over HTTP;
- cheap limits (max_tokens <= 4) so fuzzing and bursts stay cheap on 2 cores, and a small pool queue
  (16 running + 16 queued) so a burst of 64 concurrent requests meets clean 503s.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serving.conftest import SERVED

PORT = 8311
KEYS_ENV = "MOE_TEST_HARDENING_KEYS"  # serve.api_keys_env: the knob, not the default MOE_API_KEYS
BROKEN = "generalist"  # configured, not routable (the router's labels stay SERVED), adapter truncated


@dataclass(frozen=True)
class Endpoint:
    url: str  # http://127.0.0.1:PORT (routes add /v1/...)
    key: str  # from $KEYS_ENV
    file_key: str  # from serve.api_keys_file
    app: Any  # the AppConfig it serves
    broken_file: Path  # the truncated adapter weights of BROKEN
    logs: Path  # this Ray session's log folder (driver, proxy, replicas)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def post(self, path: str, timeout: float = 60, **kwargs: Any) -> httpx.Response:
        headers = {**self.auth, **kwargs.pop("headers", {})}
        return httpx.post(f"{self.url}{path}", headers=headers, timeout=timeout, **kwargs)

    def get(self, path: str, timeout: float = 60, **kwargs: Any) -> httpx.Response:
        headers = {**self.auth, **kwargs.pop("headers", {})}
        return httpx.get(f"{self.url}{path}", headers=headers, timeout=timeout, **kwargs)


def assert_openai_error(response: httpx.Response, status: int | None = None) -> dict[str, Any]:
    """The response is an error in OpenAI's shape (and has `status` when given); returns `error`."""
    assert response.status_code >= 400, response.text[:300]
    if status is not None:
        assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"].startswith("application/json"), response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    if response.status_code == 503:
        assert int(response.headers["retry-after"]) >= 1
    return error


def logged_rows(endpoint: Endpoint, request_ids: list[str], timeout_s: float = 30) -> dict[str, dict]:
    """The query-log rows of `request_ids`, once every one of them is written (the ingress writes
    them on a background thread) or `timeout_s` passed: request id -> row."""
    from serving.trust.querylog import QueryLog, query_log_url

    wanted = set(request_ids)
    deadline = time.monotonic() + timeout_s
    with QueryLog(query_log_url(endpoint.app)) as log:
        while True:
            rows = {r["request_id"]: r for r in log.requests() if r["request_id"] in wanted}
            if len(rows) == len(wanted) or time.monotonic() > deadline:
                return rows
            time.sleep(0.2)


@pytest.fixture(scope="package")
def endpoint(serve_artifacts, tiny_app, tmp_path_factory):
    from experts.config import compose
    from serving.app import start_server, stop_server
    from tests.experts.test_adapters import make_adapter

    root = tmp_path_factory.mktemp("hardening")
    artifacts = root / "artifacts"
    shutil.copytree(serve_artifacts, artifacts)
    make_adapter(tiny_app, artifacts / "experts" / BROKEN, seed=7)
    weights = artifacts / "experts" / BROKEN / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    key, file_key = f"sk-moe-{secrets.token_hex(12)}", f"sk-moe-{secrets.token_hex(12)}"
    keys_file = root / "keys.txt"
    keys_file.write_text(f"# one key per line\n{file_key}\n")
    app = compose(
        [
            "base_model=tiny",
            "train=tiny",
            f"experts=[{','.join((*SERVED, BROKEN))}]",
            f"paths.artifacts={artifacts}",
            f"serve.port={PORT}",
            "serve.max_prompt_tokens=128",
            "serve.max_tokens_limit=4",
            "serve.pool.num_cpus=0.5",
            "serve.pool.torch_threads=1",
            "serve.pool.max_ongoing_requests=16",
            "serve.pool.max_queued_requests=16",
            "serve.ingress.num_cpus=0.1",
            "serve.max_batch_size=16",
            f"serve.api_keys_env={KEYS_ENV}",
            f"serve.api_keys_file={keys_file}",
            "router.policy=mixture",
        ]
    )
    os.environ[KEYS_ENV] = key
    try:
        url = start_server(app).removesuffix("/v1")
    finally:
        del os.environ[KEYS_ENV]  # the replicas got the keys as arguments; nothing else needs them
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    yield Endpoint(url, key, file_key, app, weights, logs)
    stop_server()

"""A broken adapter at startup: the endpoint names the expert and the file, and serves the others."""

from __future__ import annotations

import shutil

import pytest

from tests.serving.conftest import SERVED
from tests.serving.hardening.conftest import BROKEN, assert_openai_error

pytestmark = pytest.mark.serve


def test_a_truncated_adapter_is_named_and_left_out(endpoint):
    from serving.app import served_experts

    ok, missing = served_experts(endpoint.app)
    assert ok == list(SERVED) and set(missing) == {BROKEN}
    assert f"expert {BROKEN!r}" in missing[BROKEN] and str(endpoint.broken_file) in missing[BROKEN]
    assert "corrupt" in missing[BROKEN]


def test_the_other_experts_still_serve(endpoint):
    models = [m["id"] for m in endpoint.get("/v1/models").json()["data"]]
    assert models == ["auto", "base", *sorted(SERVED)]
    for name in SERVED:
        body = {"model": name, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
        reply = endpoint.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200 and reply.headers["x-moe-expert"] == name


def test_asking_for_the_broken_expert_says_why(endpoint):
    body = {"model": BROKEN, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
    error = assert_openai_error(endpoint.post("/v1/chat/completions", json=body), 503)
    assert f"expert {BROKEN!r} is configured but not served" in error["message"]
    assert str(endpoint.broken_file) in error["message"]


def test_a_missing_adapter_is_named_too(endpoint, tmp_path):
    """The same check without a server: no adapter folder at all names the file it looked for."""
    import dataclasses

    from serving.app import served_experts

    shutil.copytree(endpoint.app.paths.artifacts_dir / "experts" / "legal", tmp_path / "experts" / "legal")
    app = dataclasses.replace(
        endpoint.app, paths=dataclasses.replace(endpoint.app.paths, artifacts=str(tmp_path))
    )
    ok, missing = served_experts(app)
    assert ok == ["legal"] and set(missing) == {"biomedical", "python_docs", BROKEN}
    assert "expert 'biomedical': missing" in missing["biomedical"]
    assert str(tmp_path / "experts" / "biomedical" / "adapter_config.json") in missing["biomedical"]

"""Shared fixtures: the composed config, a tiny base model, an isolated artifacts folder."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture()
def artifacts(tmp_path, monkeypatch):
    """An empty artifacts folder for one test (the cache stays shared: downloads are big)."""
    out = tmp_path / "artifacts"
    monkeypatch.setenv("MOE_ARTIFACTS", str(out))
    return out


@pytest.fixture(scope="session")
def tiny_app():
    """Config with the tiny random-weight base model and the tiny training profile."""
    from experts.base_model import ensure_base_model
    from experts.config import compose

    app = compose(["base_model=tiny", "train=tiny"])
    ensure_base_model(app.base_model, app.paths)
    return app

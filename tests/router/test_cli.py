"""`moe route` and `load_router`: config checks, JSON lines, clear errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from experts.config import compose
from experts.errors import ArtifactError, ConfigError
from router.cli import route_command
from router.model import load_router, router_dir

EXPERTS = "experts=[biomedical,legal,python_docs]"  # the toy router's labels


@pytest.fixture()
def app(artifacts):
    return compose([EXPERTS])


@pytest.fixture()
def trained(app, toy_router):
    toy_router.save(router_dir(app))
    return app


def test_router_dir_is_under_artifacts(app, artifacts):
    assert router_dir(app) == artifacts / "router"


def test_load_router_applies_config_policy(artifacts, toy_router):
    app = compose(
        [
            "experts=[biomedical,legal,python_docs,generalist]",
            "router.policy=mixture",
            "router.fallback_model=generalist",
            "router.threshold=0.3",
        ]
    )
    toy_router.save(router_dir(app))
    router = load_router(app)
    assert (router.policy, router.fallback_model, router.threshold) == ("mixture", "generalist", 0.3)


def test_load_router_refuses_other_experts(trained):
    app = compose(["experts=[biomedical,legal]"])
    with pytest.raises(
        ArtifactError, match=r"router was trained for \['biomedical', 'legal', 'python_docs'\]"
    ):
        load_router(app)


def test_unknown_fallback_model(trained):
    app = compose([EXPERTS, "router.fallback_model=lgal"])
    with pytest.raises(
        ConfigError, match="router.fallback_model 'lgal' is neither 'base' nor a configured expert"
    ):
        load_router(app)


def test_route_prints_one_json_line_per_query(trained, capsys):
    rows = route_command(
        trained, SimpleNamespace(args=["patient dose trial therapy", "football weather recipe"])
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == rows and len(lines) == 2
    assert set(lines[0]) == {"expert", "confidence", "decision", "probabilities"}
    assert (lines[0]["expert"], lines[0]["decision"]) == ("biomedical", "routed")
    assert (lines[1]["expert"], lines[1]["decision"]) == ("base", "fallback")


def test_route_reads_stdin(trained, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("copyright licence warranty\n\nimport asyncio module\n"))
    rows = route_command(trained, SimpleNamespace(args=["-"]))
    assert [r["expert"] for r in rows] == ["legal", "python_docs"]


def test_route_without_a_router_is_one_clear_error(app):
    with pytest.raises(ArtifactError, match=r"no trained router in .*router; run `moe train-router`"):
        route_command(app, SimpleNamespace(args=["hello"]))
    with pytest.raises(ConfigError, match="nothing to route"):
        route_command(app, SimpleNamespace(args=[]))


def test_moe_route_cli_error_is_one_line(artifacts):
    proc = subprocess.run(
        [sys.executable, "-m", "serving.cli", "route", "what is a tumour?"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: no trained router in {artifacts / 'router'}; run `moe train-router`"
    ]

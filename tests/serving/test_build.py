"""build_app: the typed builder places experts by config and refuses duplicates before anything runs."""

from __future__ import annotations

import dataclasses

import pytest

from experts.config import ExpertServingSpec, ResourceSpec, ServeSpec
from experts.errors import ConfigError
from serving.app import build_app, deployment_options, thread_advice
from tests.serving.conftest import SERVED, serve_config


def test_shared_pool_and_dedicated_expert(serve_artifacts):
    app = serve_config(serve_artifacts)
    dedicated = ExpertServingSpec(dedicated=True, resources=ResourceSpec(num_cpus=0.25, num_gpus=0.5))
    experts = tuple(
        dataclasses.replace(e, serving=dedicated) if e.name == "legal" else e for e in app.experts
    )
    ingress = build_app(dataclasses.replace(app, experts=experts))._bound_deployment
    pools, placement = ingress.init_args[1], ingress.init_args[2]
    assert sorted(pools) == ["expert_legal", "pool_tiny"]
    assert placement == {
        "base": "pool_tiny",
        "biomedical": "pool_tiny",
        "python_docs": "pool_tiny",
        "legal": "expert_legal",
    }
    assert pools["expert_legal"]._bound_deployment.ray_actor_options["num_gpus"] == 0.5
    assert set(SERVED) <= set(placement)
    # each pool is built with its own resources (replicas, threads, engine)
    assert pools["expert_legal"]._bound_deployment.init_args[2] == dedicated.resources
    assert pools["pool_tiny"]._bound_deployment.init_args[2] == app.serve.pool


def test_a_negative_stream_interval_is_refused():
    with pytest.raises(ConfigError, match="serve.stream_interval_s -0.1 must be >= 0"):
        ServeSpec(stream_interval_s=-0.1)


@pytest.mark.parametrize(
    ("threads", "cpus", "engine", "slow"),
    [
        (1, 2, "process", False),
        (2, 2, "process", False),  # the engine process's initial thread is one of the two
        (3, 2, "process", True),
        (2, 2, "thread", True),  # the replica's initial thread makes a third
        (2, 3, "thread", False),
        (4, 4, "thread", True),
    ],
)
def test_thread_advice_flags_more_openmp_threads_than_cpus(threads, cpus, engine, slow):
    advice = thread_advice(threads, cpus, engine)
    assert (advice is not None) == slow
    if slow:
        assert f"torch_threads <= {cpus if engine == 'process' else cpus - 1}" in advice


def test_building_with_too_many_pool_threads_warns(serve_artifacts, caplog, monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    app = serve_config(serve_artifacts)
    threads = dataclasses.replace(app.serve, pool=dataclasses.replace(app.serve.pool, torch_threads=3))
    with caplog.at_level("WARNING"):
        build_app(dataclasses.replace(app, serve=threads))
    assert any("serve.pool: torch_threads=3 on 2 CPUs" in r.getMessage() for r in caplog.records)


def test_duplicate_experts_are_refused(serve_artifacts):
    app = serve_config(serve_artifacts)
    with pytest.raises(ConfigError, match=r"\['legal'\] are configured twice"):
        build_app(dataclasses.replace(app, experts=(*app.experts, app.get_expert("legal"))))


def test_resources_become_ray_serve_options():
    opts = deployment_options(ResourceSpec(num_cpus=0.5, num_gpus=0.25, max_queued_requests=7), "pool_x")
    assert opts["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.25}
    assert opts["max_queued_requests"] == 7 and opts["num_replicas"] == 1
    auto = deployment_options(ResourceSpec(autoscaling={"min_replicas": 1, "max_replicas": 4}), "pool_x")
    assert "num_replicas" not in auto and auto["autoscaling_config"]["max_replicas"] == 4


@pytest.mark.parametrize(
    ("experts", "fallback_model", "want"),
    [
        ({"legal": 1.0}, "base", ("legal", {"legal": 1.0}, "routed")),  # served: unchanged
        ({"politics": 1.0}, "base", ("base", {"base": 1.0}, "fallback")),
        ({"politics": 1.0}, "biomedical", ("biomedical", {"biomedical": 1.0}, "fallback")),
        ({"politics": 1.0}, "generalist", ("base", {"base": 1.0}, "fallback")),  # fallback not served
        (
            {"politics": 0.6, "legal": 0.3, "biomedical": 0.1},
            "base",
            ("legal", {"legal": 0.75, "biomedical": 0.25}, "mixture"),
        ),
        ({"politics": 0.7, "legal": 0.3}, "base", ("legal", {"legal": 1.0}, "routed")),
    ],
)
def test_router_picks_of_unserved_experts_fall_back_or_renormalise(experts, fallback_model, want):
    """An expert the router knows but whose adapter is not loaded never turns a request into a 503."""
    from router.model import RoutingDecision
    from serving.pipeline import servable

    placement = {"base": "pool", "legal": "pool", "biomedical": "pool"}  # only the placement matters
    top = max(experts, key=experts.__getitem__)
    decision = RoutingDecision(top, experts, experts[top], "mixture" if len(experts) > 1 else "routed", {})
    got = servable(decision, placement, fallback_model)
    assert (got.expert, got.decision) == (want[0], want[2])
    assert got.experts == pytest.approx(want[1])
    assert got.confidence == experts[top]  # the router's own confidence is kept for the log


def test_a_router_trained_for_other_experts_still_routes_with_a_warning(serve_artifacts, tmp_path, caplog):
    """An expert file added (or removed) before `moe train-router` must not take `auto` down."""
    from serving.catalogue import load_router_or_reason

    fewer = serve_config(serve_artifacts, "experts=[biomedical,legal]")
    router, error = load_router_or_reason(fewer)
    assert error == "" and sorted(router.labels) == sorted(SERVED)
    assert "until `moe train-router` has run" in caplog.text
    missing = serve_config(tmp_path / "empty_artifacts")
    router, error = load_router_or_reason(missing)
    assert router is None and "router" in error

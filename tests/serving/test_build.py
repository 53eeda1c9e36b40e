"""build_app: the typed builder places experts by config and refuses duplicates before anything runs."""

from __future__ import annotations

import dataclasses

import pytest

from experts.errors import ConfigError
from experts.schema import ExpertServingSpec, ResourceSpec
from serving.app import build_app, deployment_options
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

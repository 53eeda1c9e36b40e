"""Tiny real artifacts for serving tests: LoRA adapters on the tiny base and a trained TF-IDF router."""

from __future__ import annotations

import pytest

from tests.experts.test_adapters import make_adapter
from tests.router.conftest import LABELS, TOY_SPEC, make_examples

SERVED = tuple(LABELS)  # biomedical, legal, python_docs: the toy router's labels


@pytest.fixture(scope="session")
def serve_artifacts(tiny_app, tmp_path_factory):
    """An artifacts folder with three tiny adapters and a router trained for exactly those labels."""
    from router.features import TfidfFeatures
    from router.train import fit_router

    root = tmp_path_factory.mktemp("serve") / "artifacts"
    for seed, name in enumerate(SERVED):
        make_adapter(tiny_app, root / "experts" / name, seed)
    router, _ = fit_router(
        list(SERVED), make_examples(120, seed=0), make_examples(40, seed=1), TOY_SPEC, TfidfFeatures()
    )
    router.save(root / "router")
    return root


def serve_config(artifacts, *overrides: str):
    """The tiny app serving SERVED from `artifacts`."""
    from experts.config import compose

    return compose(
        [
            "base_model=tiny",
            "train=tiny",
            f"experts=[{','.join(SERVED)}]",
            f"paths.artifacts={artifacts}",
            *overrides,
        ]
    )

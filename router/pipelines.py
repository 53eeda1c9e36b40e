"""The router pipelines by name (`router.pipeline` in config, `pipeline` in a saved router.json).

Adding a pipeline is one `router.features.Features` subclass and one entry here (or, from code
outside the package, `register_pipeline(MyFeatures)`): training, loading, `moe eval`, the CLI and
serving find it through this table only. Only classes in it are ever built, so a saved router
cannot name other code to run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from experts.config import PackageRef
from experts.errors import ArtifactError, ConfigError
from router.features import CombinedFeatures, EmbedFeatures, FastFeatures, Features, TfidfFeatures
from router.finetune import TunedFeatures

PIPELINES: dict[str, type[Features]] = {
    "tfidf": TfidfFeatures,  # word + character n-gram TF-IDF (the default)
    "embed": EmbedFeatures,  # frozen MiniLM sentence embeddings
    "combined": CombinedFeatures,  # both, in one sparse matrix
    "fast": FastFeatures,  # both: naive Bayes over many windows' n-grams + embeddings of a few (the demo's)
    "tuned": TunedFeatures,  # MiniLM fine-tuned on the routing task, mixed with TF-IDF
}


def register_pipeline(cls: type[Features]) -> type[Features]:
    """Add a pipeline under its `name` (usable as a class decorator); a name taken by another
    class is refused."""
    taken = PIPELINES.get(cls.name)
    if taken is not None and taken is not cls:
        raise ConfigError(f"router pipeline {cls.name!r} is already {taken.__qualname__}")
    PIPELINES[cls.name] = cls
    return cls


def pipeline_names() -> list[str]:
    return sorted(PIPELINES)


def check_pipeline(name: str) -> type[Features]:
    """The class of a configured pipeline, or a ConfigError listing the known ones."""
    if name not in PIPELINES:
        raise ConfigError(f"unknown router pipeline {name!r}; available: {pipeline_names()}")
    return PIPELINES[name]


def build_features(pipeline: str, encoder_package: PackageRef | None, downloads: Path) -> Features:
    """An unfitted feature pipeline by name (`router.pipeline`)."""
    return check_pipeline(pipeline).build(encoder_package, downloads)


def features_from_state(
    pipeline: str, meta: dict[str, Any], arrays: dict[str, np.ndarray], downloads: Path | None = None
) -> Features:
    """The fitted pipeline a saved router names (`Router.load`)."""
    if pipeline not in PIPELINES:
        raise ArtifactError(f"router pipeline {pipeline!r} is unknown; run `moe train-router`")
    return PIPELINES[pipeline].from_state(meta, arrays, downloads)

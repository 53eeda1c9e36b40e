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


TOY_WORDS = [
    "orbit",
    "comet",
    "planet",
    "nebula",
    "telescope",
    "galaxy",
    "star",
    "moon",
    "eclipse",
    "asteroid",
    "meteor",
    "cluster",
    "dwarf",
    "giant",
    "light",
    "year",
    "parallax",
    "spectrum",
    "redshift",
    "quasar",
    "pulsar",
]


def write_toy_folder(
    folder, seed: int = 0, docs: int = 40, words: tuple[str, ...] | list[str] = TOY_WORDS
) -> None:
    """A folder of plain-text documents for a user-style `source: folder` expert."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        (folder / f"note_{i:03d}.txt").write_text(" ".join(rng.choice(words) for _ in range(160)) + ".\n")


@pytest.fixture()
def user_conf(tmp_path, monkeypatch):
    """A copy of conf/ with one extra user expert `toy` (a folder of text), as MOE_CONFIG_DIR."""
    import shutil

    from experts.config import config_dir

    conf = tmp_path / "conf"
    shutil.copytree(config_dir(), conf)
    write_toy_folder(tmp_path / "toy_texts")
    (conf / "expert" / "toy.yaml").write_text(
        "# @package _global_\n"
        "expert:\n  name: toy\n  description: Astronomy notes written for the tests.\n"
        f"  data:\n    source: folder\n    path: {tmp_path / 'toy_texts'}\n    licence: CC0\n    split: [0.6, 0.2, 0.2]\n"
        "  examples: ['what is a pulsar']\n"
    )
    monkeypatch.setenv("MOE_CONFIG_DIR", str(conf))
    monkeypatch.setenv("MOE_ARTIFACTS", str(tmp_path / "artifacts"))
    return conf


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need CUDA; everywhere else (CI included) they are skipped, saying why."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (CI has none; run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def run_moe(*args: str, timeout: int = 900):
    """Run the `moe` CLI in a subprocess with this process's environment (MOE_CONFIG_DIR etc.)."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "serving.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
    )

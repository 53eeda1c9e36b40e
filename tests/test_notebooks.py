"""The notebooks execute end to end (tiny profile), so they cannot rot."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(path: Path, env: dict[str, str], timeout: int = 900) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # committed without outputs
        assert not cell.get("outputs"), f"{path.name} is committed with outputs"
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent.parent)}},
        ).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return nb


@pytest.mark.integration
def test_sweeps_notebook_runs(user_conf, tiny_app, tmp_path):
    nb = run_notebook(
        NOTEBOOKS / "sweeps.ipynb", {"MOE_NOTEBOOK_PROFILE": "tiny", "MOE_NOTEBOOK_EXPERT": "toy"}
    )
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "best trial: r=" in text
    assert list((tmp_path / "artifacts" / "sweeps").glob("*/sweep.png"))

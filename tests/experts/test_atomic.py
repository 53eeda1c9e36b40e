"""Staged writes: the target is the old one or the whole new one, and nothing is left beside it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from experts.atomic import replace_dir, replace_file, write_text


def test_replace_dir_swaps_the_whole_folder(tmp_path: Path) -> None:
    out = tmp_path / "index"
    out.mkdir()
    (out / "stale.json").write_text("old")
    with replace_dir(out) as staged:
        assert staged.is_dir() and not any(staged.iterdir())
        assert (out / "stale.json").exists()  # readers still see the old folder meanwhile
        (staged / "new.json").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_replace_dir_creates_missing_parents(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    with replace_dir(out) as staged:
        (staged / "x").write_text("1")
    assert (out / "x").read_text() == "1"


def test_replace_dir_keeps_the_old_folder_when_the_body_fails(tmp_path: Path) -> None:
    out = tmp_path / "router"
    out.mkdir()
    (out / "weights").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), replace_dir(out) as staged:
        (staged / "weights").write_text("half")
        raise RuntimeError("disk full")
    assert (out / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["router"]


def test_replace_file_keeps_the_suffix_and_the_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "cache.npz"
    with replace_file(path) as staged:
        assert staged.suffix == ".npz"  # np.savez would otherwise append one and the rename would miss
        np.savez(staged, v=np.arange(3))
    assert np.load(path)["v"].tolist() == [0, 1, 2]
    with pytest.raises(ValueError), replace_file(path) as staged:
        staged.write_bytes(b"partial")
        raise ValueError
    assert np.load(path)["v"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.npz"]


def test_write_text_replaces(tmp_path: Path) -> None:
    path = tmp_path / "card.json"
    write_text(path, "1")
    write_text(path, "2")
    assert path.read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card.json"]

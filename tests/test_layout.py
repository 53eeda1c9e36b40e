"""The house rules of docs/architecture.md that a reader feels: rooms of a readable size, one-way imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("experts", "router", "serving")
MAX_MODULE_LINES = 500  # a module reads top to bottom in one sitting
MAX_CLASS_LINES = 250  # a class that grows past this holds more than one job
SOURCES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_the_packages_have_modules_to_check():
    assert len(SOURCES) > 50, SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_classes_stay_small(path: Path):
    text = path.read_text()
    lines = len(text.splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)} has {lines} lines (> {MAX_MODULE_LINES})"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            assert size <= MAX_CLASS_LINES, f"{path.relative_to(ROOT)}: class {node.name} has {size} lines"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_flow_one_way(path: Path):
    """experts <- router <- serving: experts imports neither, router does not import serving."""
    pkg = path.relative_to(ROOT).parts[0]
    banned = {"experts": ("router", "serving"), "router": ("serving",), "serving": ()}[pkg]
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            assert name.split(".")[0] not in banned, f"{path.relative_to(ROOT)} imports {name}"

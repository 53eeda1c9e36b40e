"""Write a file or a folder so that a reader sees the old one or the whole new one, never half of it.

    with replace_dir(out) as staged:      # write into `staged`; on success it becomes `out`
        (staged / "a.json").write_text(...)
    with replace_file(path) as tmp:       # write `tmp`; on success it becomes `path`
        np.savez(tmp, ...)

The staged path is a hidden sibling of the target (same filesystem, so the swap is one rename)
named with the process id, so two processes writing the same target do not share it. If the body
raises, the staged path is removed and the target is left as it was.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _sibling(target: Path, tag: str) -> Path:
    # the suffix stays last: np.savez and friends add their own when it is missing
    return target.with_name(f".{target.stem}.{tag}-{os.getpid()}{target.suffix}")


@contextmanager
def replace_dir(out: Path) -> Iterator[Path]:
    """Yield an empty staging folder; when the body succeeds it replaces `out` (created if absent)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staged, old = _sibling(out, "tmp"), _sibling(out, "old")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    try:
        yield staged
        if out.exists():
            os.replace(out, old)  # a folder cannot be replaced by a rename while it exists
        try:
            os.replace(staged, out)
        except OSError:
            if old.exists():
                os.replace(old, out)  # put the old one back rather than lose both
            raise
    finally:
        shutil.rmtree(staged, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def replace_file(path: Path) -> Iterator[Path]:
    """Yield a staging path to write; when the body succeeds it replaces `path` in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = _sibling(path, "tmp")
    try:
        yield staged
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """`path.write_text(text)`, replacing the file in one rename."""
    with replace_file(path) as staged:
        staged.write_text(text, encoding="utf-8")

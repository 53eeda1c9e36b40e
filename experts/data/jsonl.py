"""JSON Lines files users hand us (corpora, instruction data, reviewed feedback), read one way:
blank lines skipped, every error names the file and the line."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from experts.errors import DataError


def jsonl_objects(path: Path, expected: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; `expected` says what a line must hold
    (e.g. "a JSON object with 'prompt' and 'response'") in the error for a line that is not an object."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected {expected}")
            yield lineno, row


def require_strings(path: Path, lineno: int, row: dict[str, Any], keys: Sequence[str]) -> None:
    """Each of `keys` must be a non-empty string in `row`; the error names file, line and key."""
    for key in keys:
        value = row.get(key)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{path}:{lineno}: {key!r} must be a non-empty string, got {value!r}")

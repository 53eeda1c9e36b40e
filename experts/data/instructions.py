"""Instruction data: prompt/response pairs (JSONL) for supervised fine-tuning, validated row by row."""

from __future__ import annotations

import json
from pathlib import Path

from experts.errors import DataError


def load_instructions(path: str | Path) -> list[dict[str, str]]:
    """Rows of a JSONL file, each an object with non-empty string `prompt` and `response`.

    The first bad row raises a DataError naming the file and line number.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(
            f"data.instructions {str(path)!r} is not a file; point it at a prompt/response JSONL file"
        )
    rows: list[dict[str, str]] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object with 'prompt' and 'response'")
            for key in ("prompt", "response"):
                value = row.get(key)
                if not isinstance(value, str) or not value.strip():
                    raise DataError(f"{path}:{lineno}: {key!r} must be a non-empty string, got {value!r}")
            rows.append({"prompt": row["prompt"], "response": row["response"]})
    if not rows:
        raise DataError(
            f"{path}: no instruction rows; each line needs a JSON object with prompt and response"
        )
    return rows

"""Instruction data: prompt/response pairs (JSONL) for supervised fine-tuning, validated row by row."""

from __future__ import annotations

from pathlib import Path

from experts.data.jsonl import jsonl_objects, require_strings
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
    for lineno, row in jsonl_objects(path, "a JSON object with 'prompt' and 'response'"):
        require_strings(path, lineno, row, ("prompt", "response"))
        rows.append({"prompt": row["prompt"], "response": row["response"]})
    if not rows:
        raise DataError(
            f"{path}: no instruction rows; each line needs a JSON object with prompt and response"
        )
    return rows

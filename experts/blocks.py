"""Token blocks for causal-LM training and evaluation.

Documents are tokenized with the base tokenizer, joined with EOS between them and cut into
fixed-length blocks, so every model in an evaluation sees exactly the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def token_blocks(
    texts: Iterable[str], tokenizer: Any, seq_len: int, max_blocks: int | None = None, batch: int = 256
) -> torch.Tensor:
    """Pack `texts` into an int64 tensor [n_blocks, seq_len]; stops once `max_blocks` are full."""
    ids: list[int] = []
    need = None if max_blocks is None else max_blocks * seq_len
    chunk: list[str] = []

    def flush() -> None:
        for row in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            ids.append(tokenizer.eos_token_id)
        chunk.clear()

    for text in texts:
        chunk.append(text)
        if len(chunk) >= batch:
            flush()
            if need is not None and len(ids) >= need:
                break
    if chunk and (need is None or len(ids) < need):
        flush()
    n = len(ids) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)

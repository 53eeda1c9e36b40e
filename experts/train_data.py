"""The training data of one expert: its corpus as token blocks, instruction tasks, reviewed corrections.

`build_train_data` assembles what `experts.train` trains on: fixed-length rows of raw text (the
generalist takes an equal share of every routable corpus), chat-template instruction rows with the
loss on the response only, and validation and test blocks that are the same for every model of a
domain.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

import torch

from experts.blocks import token_blocks
from experts.config import AppConfig, ExpertSpec
from experts.data.instructions import load_instructions
from experts.errors import ArtifactError, DataError
from experts.evaluate import chat_example

MIXTURE = "mixture"  # data.source of the generalist: an equal mixture of every routable expert's corpus


@dataclasses.dataclass
class TrainData:
    """Training examples as fixed-length rows; labels -100 where no loss is taken."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    val: torch.Tensor  # validation token blocks
    test: torch.Tensor  # held-out test token blocks (same for every model of this domain)
    sources: dict[str, int]  # blocks per source corpus


def _shuffled_texts(split: Any, seed: int) -> list[str]:
    texts = split["text"]  # one columnar read; row-by-row access is far slower
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    return [texts[i] for i in order]


def domain_blocks(slug: str, app: AppConfig, tokenizer: Any, split: str, n_blocks: int) -> torch.Tensor:
    """`n_blocks` token blocks of `seq_len` from one expert's corpus split (deterministic)."""
    from experts.data import load_corpus

    corpus = load_corpus(slug, app.paths)
    if split not in corpus:
        raise ArtifactError(f"corpus of {slug!r} has no {split!r} split; run `moe data expert={slug}`")
    return token_blocks(
        _shuffled_texts(corpus[split], app.train.seed), tokenizer, app.train.seq_len, n_blocks
    )


def instruction_rows(
    rows: list[dict[str, str]], tokenizer: Any, seq_len: int, system: str
) -> tuple[torch.Tensor, ...]:
    """Chat-template prompt/response pairs, loss on the response tokens only."""
    ids_out, labels_out, mask_out = [], [], []
    for row in rows:
        ids, labels = chat_example(tokenizer, system, row["prompt"], row["response"], seq_len)
        pad = seq_len - len(ids)
        ids_out.append(ids + [tokenizer.pad_token_id] * pad)
        labels_out.append(labels + [-100] * pad)
        mask_out.append([1] * len(ids) + [0] * pad)
    return (
        torch.tensor(ids_out, dtype=torch.long),
        torch.tensor(labels_out, dtype=torch.long),
        torch.tensor(mask_out, dtype=torch.long),
    )


def build_train_data(
    app: AppConfig, spec: ExpertSpec, tokenizer: Any, extra_instructions: list[dict[str, str]] | None = None
) -> TrainData:
    """Token blocks for training, validation and test; the generalist mixes every routable corpus."""
    t = app.train
    want = t.steps * t.batch_size * t.grad_accum  # one pass: every step sees new blocks
    if t.max_train_blocks is not None:
        want = min(want, t.max_train_blocks)
    # Reviewed corrections are few and precious: each is seen `feedback_repeat` times, and corpus
    # blocks make room for them so they all fall inside the one pass (the corpus keeps >= half).
    feedback = list(extra_instructions or []) * t.feedback_repeat
    want = max(want - len(feedback), math.ceil(want / 2))
    tasks = _corpus_tasks(app, spec, round(want * t.instruction_ratio))
    want -= len(tasks)
    val_n, test_n = t.eval_batches * t.batch_size, t.test_batches * t.batch_size
    if spec.data.source == MIXTURE:
        domains = [e.name for e in app.experts if e.routable]
        if not domains:
            raise DataError("the generalist mixes the routable experts' corpora, but none is configured")
        share = math.ceil(want / len(domains))
        parts = {d: domain_blocks(d, app, tokenizer, "train", share) for d in domains}
        train = torch.cat(list(parts.values()))
        # validation/test of the mixture: equal slices of every domain
        val = torch.cat(
            [domain_blocks(d, app, tokenizer, "validation", max(1, val_n // len(domains))) for d in domains]
        )
        test = torch.cat(
            [domain_blocks(d, app, tokenizer, "test", max(1, test_n // len(domains))) for d in domains]
        )
        sources = {d: len(b) for d, b in parts.items()}
    else:
        train = domain_blocks(spec.name, app, tokenizer, "train", want)
        val = domain_blocks(spec.name, app, tokenizer, "validation", val_n)
        test = domain_blocks(spec.name, app, tokenizer, "test", test_n)
        sources = {spec.name: len(train)}
    if len(train) == 0 or len(val) == 0:
        raise DataError(
            f"expert {spec.name!r}: corpus too small for seq_len {t.seq_len} "
            f"({len(train)} train / {len(val)} validation blocks)"
        )
    ids, labels, mask = train, train.clone(), torch.ones_like(train)
    instructions = _load_instructions(app, spec) + feedback + tasks
    if feedback:
        sources["feedback"] = len(feedback)
    if tasks:
        sources["tasks"] = len(tasks)
    if instructions:
        i_ids, i_labels, i_mask = instruction_rows(
            instructions, tokenizer, t.seq_len, spec.generation.system_prompt
        )
        ids, labels, mask = torch.cat([ids, i_ids]), torch.cat([labels, i_labels]), torch.cat([mask, i_mask])
        sources["instructions"] = len(i_ids)
    return TrainData(ids, labels, mask, val, test, sources)


def _load_instructions(app: AppConfig, spec: ExpertSpec) -> list[dict[str, str]]:
    if spec.data.source == MIXTURE or spec.data.instructions is None:
        return []
    from experts.data import load_corpus

    corpus = load_corpus(spec.name, app.paths)
    if "instructions" not in corpus:
        return []
    return [{"prompt": r["prompt"], "response": r["response"]} for r in corpus["instructions"]]


def _corpus_tasks(app: AppConfig, spec: ExpertSpec, n: int) -> list[dict[str, str]]:
    """`n` instruction tasks made from the train split(s) (`moe data` writes them; built here when a
    corpus predates them), a seeded sample; the generalist takes an equal share of every domain's."""
    from experts.data import load_card
    from experts.data.tasks import load_tasks, write_tasks

    if n <= 0:
        return []
    domains = [e for e in app.experts if e.routable] if spec.data.source == MIXTURE else [spec]
    share = math.ceil(n / max(1, len(domains)))
    out: list[dict[str, str]] = []
    for domain in domains:
        folder = app.paths.data_dir(domain.name)
        load_card(domain.name, app.paths)  # a clear error when the corpus is missing
        write_tasks(domain.name, domain.data.source, folder)
        rows = load_tasks(folder)
        random.Random(f"{app.train.seed}:{domain.name}").shuffle(rows)
        out.extend({"prompt": r["prompt"], "response": r["response"]} for r in rows[:share])
    return out[:n]


def feedback_instructions(app: AppConfig, spec: ExpertSpec) -> list[dict[str, str]]:
    """Reviewed corrections exported by `moe feedback export` (artifacts/feedback/<slug>.jsonl)."""
    path = app.paths.artifacts_dir / "feedback" / f"{spec.name}.jsonl"
    if not app.train.include_feedback or not path.exists() or not path.read_text().strip():
        return []
    return load_instructions(path)  # the same row-by-row validation as data.instructions

"""Instruction tasks made from a corpus's own structure: no external model, deterministic.

Each corpus kind (its `data.source`) has one builder that turns a document of a split into
  - instruction tasks (prompt -> response): PubMed title -> summary and abstract -> title, "what was
    studied / found"; man pages "What does `cmd` do?" -> NAME + first DESCRIPTION paragraph and
    option texts; Python docs API entries and sections; licence clauses (require / permit / forbid);
    State of the Union passages by president, topic and year; Bible verses by reference and
    commentaries by chapter;
  - multiple-choice keys (question, the document's own answer): which title fits this abstract,
    which page a description belongs to, which licence a clause comes from, which president gave
    a passage, which book a passage is from. Distractors are the answers of other documents of the
    SAME split and domain, so eval items built from the test split never see a train document; with
    `train.task_distractors=similar`, for a free-text answer (a title) the nearest such answers.

`moe data` writes the train split's tasks beside the corpus (`instructions.jsonl`, counts in
card.json); `moe eval` builds its items from the test split the same way. Choices are made with
random generators seeded by the document id, so a build is the same on every run and machine.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from experts.atomic import write_text
from experts.errors import DataError

TASKS_VERSION = 1  # bump when a builder changes what it makes: saved instructions rebuild
MAX_INSTRUCTIONS = 5000  # rows written per corpus; training uses a few hundred (train.instruction_ratio)
N_OPTIONS = 4  # options of a multiple-choice item: the right answer and three distractors
DISTRACTORS = ("similar", "random")  # how the three are picked: the values of train.task_distractors
# Kinds whose answer is free text (a study's title, a document's title): `similar` draws their
# distractors from the titles of the documents whose question text (the abstract) is nearest (word
# TF-IDF cosine), so "which title fits this abstract" asks which of four studies on the same subject
# it is, not which of four subjects. Names (a licence, a president, a command) keep random
# distractors: their neighbours are often right too (GPL-2.0 and GPL-3.0 share clauses).
SIMILAR_KINDS = frozenset({"title", "document"})
NEIGHBOURS = 8  # `similar`: the distractors are drawn from this many nearest answers
NEAR_DUPLICATE = 0.9  # ...leaving out any whose question is this close (cosine): the same study again
COMMON_WORDS = 0.9  # words in more than this share of the questions (the item's own wording) don't count


@dataclass(frozen=True)
class SplitDoc:
    """One document of a saved split: its chunks joined back in order."""

    doc_id: str
    title: str
    chunks: tuple[str, ...]
    meta: dict[str, Any]

    @property
    def text(self) -> str:
        return "\n\n".join(self.chunks)


@dataclass(frozen=True)
class Task:
    """An instruction made from one document: `prompt` -> `response`."""

    kind: str
    doc_id: str
    prompt: str
    response: str


@dataclass(frozen=True)
class Choice:
    """A multiple-choice item: `options[answer]` is the item's own document's answer; the others
    come from `option_docs` (other documents of the same split)."""

    kind: str
    doc_id: str
    question: str
    options: tuple[str, ...]
    answer: int
    option_docs: tuple[str, ...]


Key = tuple[str, str, str]  # (kind, question, answer) of one document, for multiple choice
Builder = Callable[[SplitDoc], tuple[list[Task], list[Key]]]
BUILDERS: dict[str, Builder] = {}


def register_builder(*sources: str) -> Callable[[Builder], Builder]:
    """Register a task builder for documents of `data.source` in `sources`."""

    def decorate(fn: Builder) -> Builder:
        for source in sources:
            BUILDERS[source] = fn
        return fn

    return decorate


def stable_seed(*parts: str) -> int:
    """A 64-bit seed from strings, the same on every run and machine (unlike hash())."""
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest()[:8], "big")


def builder_for(source: str) -> Builder:
    """The task builder of a corpus kind; the generic one for user sources."""
    from experts.data import task_builders  # registers the builders of the shipped corpus kinds

    return BUILDERS.get(source, task_builders.generic_tasks)


# --------------------------------------------------------------------------------------------
# From a saved split to tasks and multiple-choice items
# --------------------------------------------------------------------------------------------
def split_documents(split: Any) -> list[SplitDoc]:
    """The documents of a saved corpus split (rows doc_id/chunk/text/title/meta), sorted by id."""
    cols = {c: split[c] for c in ("doc_id", "chunk", "text", "title", "meta")}
    grouped: dict[str, list[int]] = {}
    for i, doc_id in enumerate(cols["doc_id"]):
        grouped.setdefault(doc_id, []).append(i)
    docs = []
    for doc_id in sorted(grouped):
        rows = sorted(grouped[doc_id], key=lambda i: cols["chunk"][i])
        meta = json.loads(cols["meta"][rows[0]] or "{}")
        docs.append(SplitDoc(doc_id, cols["title"][rows[0]], tuple(cols["text"][i] for i in rows), meta))
    return docs


def _spread(items: Sequence[Any], limit: int | None, salt: str) -> list[Any]:
    """Up to `limit` items, one per document in a hash order first, then a second per document...:
    a small selection covers as many documents (and kinds) as it can."""
    per_doc: dict[str, list[Any]] = {}
    for item in items:
        per_doc.setdefault(item.doc_id, []).append(item)
    order = sorted(per_doc, key=lambda d: stable_seed(salt, d))
    for d in order:
        random.Random(stable_seed(salt, "within", d)).shuffle(per_doc[d])
    out: list[Any] = []
    depth = 0
    while (limit is None or len(out) < limit) and any(depth < len(per_doc[d]) for d in order):
        for d in order:
            if depth < len(per_doc[d]):
                out.append(per_doc[d][depth])
                if limit is not None and len(out) >= limit:
                    break
        depth += 1
    return out


def build_tasks(source: str, docs: Iterable[SplitDoc], limit: int | None = None) -> list[Task]:
    """Instruction tasks of `docs` (every kind the builder makes), spread over documents."""
    builder = builder_for(source)
    tasks = [t for doc in docs for t in builder(doc)[0] if t.prompt.strip() and t.response.strip()]
    return _spread(tasks, limit, "tasks")


def _neighbours(questions: dict[str, str]) -> dict[str, list[str]]:
    """answer -> the other answers whose question (an abstract) is nearest its own, best first (word
    TF-IDF cosine, English stop words and COMMON_WORDS out, ties by text); near copies of the
    question (the same study twice: its title fits too) and questions sharing no word left out.
    {} without words."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    answers = sorted(questions)
    try:
        vectorizer = TfidfVectorizer(
            sublinear_tf=True, stop_words="english", max_df=COMMON_WORDS, dtype=np.float64
        )
        x = vectorizer.fit_transform([questions[a] for a in answers])
    except ValueError:  # an empty vocabulary
        return {}
    out: dict[str, list[str]] = {}
    for start in range(0, len(answers), 512):
        sims = np.round((x[start : start + 512] @ x.T).toarray(), 6)  # rounded: the same order everywhere
        for row, sim in enumerate(sims):
            i = start + row
            sim[i] = 0.0
            sim[sim >= NEAR_DUPLICATE] = 0.0
            order = np.lexsort((np.arange(len(answers)), -sim))[:NEIGHBOURS]
            out[answers[i]] = [answers[j] for j in order if sim[j] > 0]
    return out


def _distractors(pool: Sequence[str], near: Sequence[str], rng: random.Random) -> list[str]:
    """The three wrong options: from `near` (the answer's neighbours) where it has them, then from
    the rest of `pool` (sorted, without the answer) at random."""
    picked = rng.sample(list(near), min(len(near), N_OPTIONS - 1))
    rest = [a for a in pool if a not in picked]
    return picked + rng.sample(rest, N_OPTIONS - 1 - len(picked))


def build_choices(
    source: str, docs: Sequence[SplitDoc], limit: int | None = None, distractors: str = "random"
) -> list[Choice]:
    """Multiple-choice items: each key's answer and three distractors, the answers of the same kind
    of other documents in `docs` (so: the same split and domain); `distractors` (DISTRACTORS):
    `similar` draws them from the answer's nearest answers for SIMILAR_KINDS, `random` from all."""
    if distractors not in DISTRACTORS:
        raise DataError(f"unknown distractors {distractors!r}; choose one of {list(DISTRACTORS)}")
    builder = builder_for(source)
    keys = [(doc.doc_id, key) for doc in docs for key in builder(doc)[1]]
    seen: dict[tuple[str, str], set[str]] = {}
    for _, (kind, question, answer) in keys:
        seen.setdefault((kind, question), set()).add(answer)
    keys = [(d, k) for d, k in keys if len(seen[k[:2]]) == 1]  # one question, two answers: ambiguous
    answers: dict[str, dict[str, str]] = {}  # kind -> answer -> first document giving it
    asked: dict[str, dict[str, str]] = {}  # kind -> answer -> the question of that first key
    for doc_id, (kind, question, answer) in keys:
        answers.setdefault(kind, {}).setdefault(answer, doc_id)
        asked.setdefault(kind, {}).setdefault(answer, question)
    near = {
        kind: _neighbours(asked[kind]) if distractors == "similar" and kind in SIMILAR_KINDS else {}
        for kind in answers
    }
    items = []
    for doc_id, (kind, question, answer) in keys:
        pool = sorted(a for a in answers[kind] if a != answer)
        if len(pool) < N_OPTIONS - 1:
            continue
        rng = random.Random(stable_seed("choice", kind, doc_id, question))
        options = [answer, *_distractors(pool, near[kind].get(answer, []), rng)]
        rng.shuffle(options)
        items.append(
            Choice(
                kind,
                doc_id,
                question,
                tuple(options),
                options.index(answer),
                tuple(doc_id if o == answer else answers[kind][o] for o in options),
            )
        )
    return _spread(items, limit, "choices")


def check_choices(items: Iterable[Choice], source: str, docs: Sequence[SplitDoc]) -> None:
    """Every item's keyed option must be its own document's answer, and every option must come
    from one of `docs`; a DataError names the first item that breaks either."""
    by_id = {d.doc_id: d for d in docs}
    builder = builder_for(source)
    for item in items:
        for doc_id in item.option_docs:
            if doc_id not in by_id:
                raise DataError(
                    f"{item.kind} item of {item.doc_id!r}: option from {doc_id!r}, not in this split"
                )
        own = [a for k, q, a in builder(by_id[item.doc_id])[1] if (k, q) == (item.kind, item.question)]
        if item.options[item.answer] not in own:
            raise DataError(
                f"{item.kind} item of {item.doc_id!r}: the key marks {item.options[item.answer]!r}, "
                f"but the document's answer is {own[0] if own else None!r}"
            )


# --------------------------------------------------------------------------------------------
# Saved beside the corpus: instructions.jsonl + counts in card.json
# --------------------------------------------------------------------------------------------
def instructions_path(data_dir: Path) -> Path:
    return data_dir / "instructions.jsonl"


def write_tasks(slug: str, source: str, data_dir: Path) -> dict[str, Any]:
    """Build the train split's tasks and write `instructions.jsonl` beside the corpus, with their
    counts in its card.json (`tasks`); a no-op when the card says they are current."""
    from datasets import DatasetDict

    card_path = data_dir / "card.json"
    card = json.loads(card_path.read_text())
    stamp = {"version": TASKS_VERSION, "config_hash": card.get("config_hash")}
    current = card.get("tasks") or {}
    if {k: current.get(k) for k in stamp} == stamp and instructions_path(data_dir).exists():
        return current
    train = DatasetDict.load_from_disk(str(data_dir / "dataset"))["train"]
    tasks = build_tasks(source, split_documents(train), MAX_INSTRUCTIONS)
    by_kind: dict[str, int] = {}
    for t in tasks:
        by_kind[t.kind] = by_kind.get(t.kind, 0) + 1
    write_text(
        instructions_path(data_dir), "".join(json.dumps(asdict(t), ensure_ascii=False) + "\n" for t in tasks)
    )
    card["tasks"] = {
        **stamp,
        "split": "train",
        "rows": len(tasks),
        "documents": len({t.doc_id for t in tasks}),
        "by_kind": dict(sorted(by_kind.items())),
        "builder": builder_for(source).__name__,
    }
    write_text(card_path, json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    if not tasks:
        print(f"note: expert {slug!r}: its corpus gave no instruction tasks", flush=True)
    return card["tasks"]


def load_tasks(data_dir: Path) -> list[dict[str, str]]:
    """The saved instruction rows (prompt, response, kind, doc_id) of a corpus."""
    path = instructions_path(data_dir)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

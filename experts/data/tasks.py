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
    SAME split and domain, so eval items built from the test split never see a train document.

`moe data` writes the train split's tasks beside the corpus (`instructions.jsonl`, counts in
card.json); `moe eval` builds its items from the test split the same way. Choices are made with
random generators seeded by the document id, so a build is the same on every run and machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from experts.errors import DataError

TASKS_VERSION = 1  # bump when a builder changes what it makes: saved instructions rebuild
MAX_INSTRUCTIONS = 5000  # rows written per corpus; training uses a few hundred (train.instruction_ratio)
N_OPTIONS = 4  # options of a multiple-choice item: the right answer and three distractors
_PROMPT_WORDS = 100  # passages inside a prompt are cut to this many words (~140 tokens)
_ANSWER_WORDS = 100  # and answers too: a task fits a 256-token training row


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


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def _seed(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest()[:8], "big")


def _words(text: str, n: int) -> str:
    words = text.split()
    return " ".join(words[:n]) + (" ..." if len(words) > n else "")


def _flat(text: str) -> str:
    return " ".join(text.split())


def _paragraphs(text: str) -> list[str]:
    return [p for p in (_flat(p) for p in re.split(r"\n\s*\n", text)) if p]


def _mask(text: str, *names: str) -> str:
    """The answer's own name blanked out of a question, so the item asks for knowledge, not copying."""
    for name in sorted({n for n in names if len(n) >= 2}, key=len, reverse=True):
        text = re.sub(rf"(?<!\w){re.escape(name)}(?!\w)", "___", text, flags=re.IGNORECASE)
    return text


_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE.split(_flat(text)) if s]


# --------------------------------------------------------------------------------------------
# Builders, one per corpus kind
# --------------------------------------------------------------------------------------------
@register_builder("pubmed")
def pubmed_tasks(doc: SplitDoc) -> tuple[list[Task], list[Key]]:
    """Title -> summary, abstract -> title, what was studied (objective) and found (conclusions)."""
    title = _flat(doc.title)
    body = doc.text.split("\n\n", 1)[1] if "\n\n" in doc.text and title else doc.text
    parts = [p.strip() for p in body.split("\n") if p.strip()]
    if not title or not parts:
        return [], []
    labelled = {p.split(":", 1)[0].lower(): p.split(":", 1)[1].strip() for p in parts if ":" in p[:30]}
    abstract = _flat(" ".join(parts))
    sents = _sentences(abstract)
    studied = next(
        (
            labelled[k]
            for k in ("objective", "objectives", "purpose", "aim", "aims", "background")
            if k in labelled
        ),
        sents[0] if sents else "",
    )
    found = next(
        (labelled[k] for k in ("conclusions", "conclusion", "results") if k in labelled),
        " ".join(sents[-2:]),
    )
    d = doc.doc_id
    tasks = [
        Task(
            "abstract_to_title",
            d,
            f"Suggest a title for this abstract:\n\n{_words(abstract, _PROMPT_WORDS)}",
            title,
        ),
        Task(
            "title_to_summary", d, f'Summarise the study titled "{title}".', _words(abstract, _ANSWER_WORDS)
        ),
        Task("studied", d, f'What was studied in "{title}"?', _words(studied, _ANSWER_WORDS)),
        Task("found", d, f'What did the study "{title}" find?', _words(found, _ANSWER_WORDS)),
    ]
    keys = [("title", f"Which title fits this abstract?\n\n{_words(abstract, _PROMPT_WORDS)}", title)]
    return tasks, keys


_FORBID = re.compile(r"\b(may not|must not|shall not|cannot|prohibited|not permitted|no right to)\b", re.I)
_REQUIRE = re.compile(r"\b(must|shall|required to|provided that|on condition that|subject to)\b", re.I)
_PERMIT = re.compile(
    r"\b(permission is hereby granted|hereby grants?|is granted|you may|are free to)\b", re.I
)


@register_builder("scancode")
def licence_tasks(doc: SplitDoc) -> tuple[list[Task], list[Key]]:
    """What the licence requires / permits / forbids -> the clause; its category; clause -> licence."""
    name = _flat(doc.title) or doc.doc_id
    paras = [p for p in _paragraphs(doc.text) if len(p.split()) >= 12]
    if not paras:
        return [], []
    clauses: dict[str, str] = {}
    for para in paras:
        for verb, pattern in (("forbid", _FORBID), ("permit", _PERMIT), ("require", _REQUIRE)):
            if verb not in clauses and pattern.search(para):
                clauses[verb] = para
                break
    d = doc.doc_id
    tasks = [
        Task(f"licence_{verb}", d, f"What does the {name} {verb}?", _words(clause, _ANSWER_WORDS))
        for verb, clause in sorted(clauses.items())
    ]
    if doc.meta.get("category"):
        tasks.append(
            Task(
                "licence_category",
                d,
                f"What kind of licence is the {name}?",
                f"{name} is a {doc.meta['category']} licence.",
            )
        )
    spdx = str(doc.meta.get("spdx_license_key", ""))
    clause = clauses.get("require") or clauses.get("permit") or clauses.get("forbid") or paras[0]
    question = (
        f"Which licence does this clause come from?\n\n{_words(_mask(clause, name, spdx, d), _PROMPT_WORDS)}"
    )
    tasks.append(Task("clause_to_licence", d, question, name))
    return tasks, [("licence", question, name)]


_PY_SIGNATURE = re.compile(
    r"^(?:(?:class|exception|await|coroutine)\s+)?(?:[\w*]+\s+)*?\**([A-Za-z_][\w.]*)\((.*)\)\s*$"
)


def _blocks(text: str) -> list[tuple[int, str]]:
    """(indent of its first line, text) of each blank-line separated block."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.split("\n") if ln.strip()]
        if lines:
            out.append((len(lines[0]) - len(lines[0].lstrip()), "\n".join(lines)))
    return out


@register_builder("python_docs")
def python_doc_tasks(doc: SplitDoc) -> tuple[list[Task], list[Key]]:
    """API entry -> its description, heading -> its section, page -> its first paragraph."""
    blocks = _blocks(doc.text)
    d, page = doc.doc_id, _flat(doc.title) or doc.doc_id
    tasks: list[Task] = []
    keys: list[Key] = []
    for (indent, head), (next_indent, body) in zip(blocks, blocks[1:], strict=False):
        single = "\n" not in head
        m = _PY_SIGNATURE.match(head) if single and indent == 0 else None
        if m and next_indent > 0 and len(body.split()) >= 8:
            desc = _flat(body)
            tasks.append(
                Task("api", d, f"In Python, what does `{_flat(head)}` do?", _words(desc, _ANSWER_WORDS))
            )
            short = m.group(1).rsplit(".", 1)[-1]
            question = f"Which Python name does this documentation describe?\n\n{_words(_mask(desc, short, m.group(1)), _PROMPT_WORDS)}"
            keys.append(("api_name", question, m.group(1)))
        elif (
            single
            and indent == 0
            and next_indent == 0
            and 1 <= len(head.split()) <= 8
            and not head.rstrip().endswith((".", ":", ",", ";", ")"))
            and not head.startswith("Source code")
            and len(body.split()) >= 20
        ):
            tasks.append(
                Task(
                    "section",
                    d,
                    f'What does the section "{_flat(head)}" of the Python documentation page "{page}" say?',
                    _words(_flat(body), _ANSWER_WORDS),
                )
            )
    first = next((_flat(b) for i, b in blocks if i == 0 and len(b.split()) >= 20), "")
    if first:
        tasks.append(
            Task(
                "page",
                d,
                f'What is the Python documentation page "{page}" about?',
                _words(first, _ANSWER_WORDS),
            )
        )
        keys.append(
            (
                "page",
                f"Which page of the Python documentation is this passage from?\n\n{_words(_mask(first, page), _PROMPT_WORDS)}",
                page,
            )
        )
    return tasks, keys


_MAN_SECTION = re.compile(r"^([A-Z][A-Z /-]+)$")
_MAN_OPTION = re.compile(r"^ {5,9}(-{1,2}[\w?][^\s].*|-\w)$")


def _man_sections(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.split("\n"):
        m = _MAN_SECTION.match(line)
        if m:
            current = m.group(1).strip()
            sections.setdefault(current, [])
        elif current is not None:
            sections[current].append(line)
    return sections


@register_builder("man")
def man_tasks(doc: SplitDoc) -> tuple[list[Task], list[Key]]:
    """ "What does `cmd` do?" -> NAME + first DESCRIPTION paragraph; options -> their text and back."""
    sections = _man_sections(doc.text)
    name_line = _flat(" ".join(sections.get("NAME", [])))
    if " - " not in name_line:
        return [], []
    name = doc.title.split("(", 1)[0] or doc.doc_id
    d = doc.doc_id
    description = next(
        (_flat(p) for p in re.split(r"\n\s*\n", "\n".join(sections.get("DESCRIPTION", []))) if p.strip()), ""
    )
    answer = name_line + (f". {description}" if description else "")
    tasks = [Task("man_what", d, f"What does `{name}` do?", _words(answer, _ANSWER_WORDS))]
    lines = sections.get("OPTIONS") or sections.get("DESCRIPTION") or []
    rng = random.Random(_seed("options", d))
    options: list[tuple[str, str]] = []
    for i, line in enumerate(lines):
        m = _MAN_OPTION.match(line)
        if not m:
            continue
        body = []
        for nxt in lines[i + 1 :]:
            if not nxt.strip() or len(nxt) - len(nxt.lstrip()) <= len(line) - len(line.lstrip()):
                break
            body.append(nxt)
        if body:
            options.append((m.group(1).strip(), _flat(" ".join(body))))
    for opt, text in rng.sample(options, min(3, len(options))):
        tasks.append(
            Task(
                "man_option", d, f"What does the `{opt}` option of `{name}` do?", _words(text, _ANSWER_WORDS)
            )
        )
        tasks.append(
            Task("man_which_option", d, f"Which option of `{name}` does this: {_words(text, 60)}", opt)
        )
    short = name_line.split(" - ", 1)[1]
    names = [n.strip() for n in name_line.split(" - ", 1)[0].split(",")]
    question = f"Which manual page does this description belong to?\n\n{_words(_mask(short + '. ' + description, *names), _PROMPT_WORDS)}"
    return tasks, [("man_page", question, doc.title)]


# OSIS book abbreviations (the SWORD modules' chapter ids) -> English names
_BOOKS = dict(
    item.split("=")
    for item in (
        "Gen=Genesis Exod=Exodus Lev=Leviticus Num=Numbers Deut=Deuteronomy Josh=Joshua Judg=Judges "
        "Ruth=Ruth 1Sam=1_Samuel 2Sam=2_Samuel 1Kgs=1_Kings 2Kgs=2_Kings 1Chr=1_Chronicles "
        "2Chr=2_Chronicles Ezra=Ezra Neh=Nehemiah Esth=Esther Job=Job Ps=Psalms Prov=Proverbs "
        "Eccl=Ecclesiastes Song=Song_of_Solomon Isa=Isaiah Jer=Jeremiah Lam=Lamentations Ezek=Ezekiel "
        "Dan=Daniel Hos=Hosea Joel=Joel Amos=Amos Obad=Obadiah Jonah=Jonah Mic=Micah Nah=Nahum "
        "Hab=Habakkuk Zeph=Zephaniah Hag=Haggai Zech=Zechariah Mal=Malachi Matt=Matthew Mark=Mark "
        "Luke=Luke John=John Acts=Acts Rom=Romans 1Cor=1_Corinthians 2Cor=2_Corinthians "
        "Gal=Galatians Eph=Ephesians Phil=Philippians Col=Colossians 1Thess=1_Thessalonians "
        "2Thess=2_Thessalonians 1Tim=1_Timothy 2Tim=2_Timothy Titus=Titus Phlm=Philemon "
        "Heb=Hebrews Jas=James 1Pet=1_Peter 2Pet=2_Peter 1John=1_John 2John=2_John 3John=3_John "
        "Jude=Jude Rev=Revelation Tob=Tobit Jdt=Judith EsthGr=Esther_(Greek) Wis=Wisdom Sir=Sirach "
        "Bar=Baruch 1Macc=1_Maccabees 2Macc=2_Maccabees 3Macc=3_Maccabees 4Macc=4_Maccabees "
        "1Esd=1_Esdras 2Esd=2_Esdras PrMan=Prayer_of_Manasseh DanGr=Daniel_(Greek) AddPs=Psalm_151"
    )
    .replace("_", "~")
    .split()
)


@register_builder("sword")
def sword_tasks(doc: SplitDoc) -> tuple[list[Task], list[Key]]:
    """Reference -> verse and verse -> reference (Bible), chapter -> commentary; which book."""
    ref = doc.doc_id.split(":", 1)[-1]
    book, _, chapter = ref.rpartition(".")
    if book not in _BOOKS or not chapter.isdigit():
        return [], []  # book introductions and unnumbered blocks
    book_name = _BOOKS[book].replace("~", " ")
    work = doc.title.rsplit(" - ", 1)[0] or doc.doc_id.split(":", 1)[0]
    d = doc.doc_id
    rng = random.Random(_seed("verses", d))
    tasks: list[Task] = []
    if "bible" in work.lower():
        # Prose chapters hold one verse a line; poetry breaks verses into lines (and blank lines).
        if not any("\n\n" in c for c in doc.chunks):
            lines = [v.strip() for c in doc.chunks for v in c.split("\n")]
            verses = [v for v in lines if v and not re.fullmatch(r"Chapter \d+", v)]  # headings
            for n in sorted(rng.sample(range(len(verses)), min(3, len(verses)))):
                where = f"{book_name} {chapter}:{n + 1}"
                tasks.append(Task("quote_verse", d, f"Quote {where} ({work}).", verses[n]))
                tasks.append(
                    Task("locate_verse", d, f'Where in the Bible is this verse: "{verses[n]}"?', where)
                )
        question = "Which book of the Bible is this passage from?"
    else:
        tasks.append(
            Task(
                "commentary",
                d,
                f"What does {work} say about {book_name} {chapter}?",
                _words(_flat(doc.text), _ANSWER_WORDS),
            )
        )
        question = "Which book of the Bible does this commentary discuss?"
    words = doc.text.split()
    start = rng.randrange(max(1, len(words) - 80))
    passage = _mask(" ".join(words[start : start + 80]), book_name, book)
    return tasks, [("bible_book", f"{question}\n\n{passage}", book_name)]


_TOPICS = {
    "the economy": ("economy", "economic", "prosperity", "depression", "recession", "business", "industry"),
    "taxes": ("tax", "taxes", "taxation", "revenue", "tariff", "duties"),
    "war and defense": ("war", "army", "navy", "military", "defense", "troops", "enemy"),
    "foreign relations": ("treaty", "foreign", "nations", "diplomatic", "minister", "ally", "allies"),
    "education": ("education", "schools", "school", "students", "teachers", "college"),
    "the public debt": ("debt", "loan", "loans", "deficit", "bonds", "credit"),
    "agriculture": ("agriculture", "farmers", "farm", "farms", "crops"),
    "health care": ("health", "medical", "medicare", "disease", "hospitals"),
    "immigration": ("immigration", "immigrants", "aliens", "naturalization"),
    "energy": ("energy", "oil", "coal", "fuel", "power"),
    "civil rights": ("rights", "liberty", "equality", "slavery", "slaves", "discrimination"),
    "the currency and banks": ("currency", "bank", "banks", "coin", "gold", "silver", "money"),
}


@register_builder("sotu")
def sotu_tasks(doc: SplitDoc) -> tuple[list[Task], list[Key]]:
    """What did President X say about <topic> in <year>? -> the passage; which president said this."""
    president, year = str(doc.meta.get("president", "")), str(doc.meta.get("year", ""))
    sents = _sentences(doc.text)
    if not president or len(sents) < 5:
        return [], []
    windows = [" ".join(sents[i : i + 4]) for i in range(0, len(sents) - 3, 4)]
    d = doc.doc_id
    tasks: list[Task] = []
    for topic, words in _TOPICS.items():
        scored = [
            (sum(w.lower().strip(".,;:") in words for w in win.split()), -i, win)
            for i, win in enumerate(windows)
        ]
        hits, _, best = max(scored)
        if hits >= 3:
            tasks.append(
                Task(
                    "sotu_topic",
                    d,
                    f"What did President {president} say about {topic} in his {year} State of the Union address?",
                    _words(best, _ANSWER_WORDS),
                )
            )
    rng = random.Random(_seed("windows", d))
    picked = sorted(rng.sample(range(len(windows)), min(6, len(windows))))
    last = president.split()[-1]
    keys = [
        (
            "president",
            f"Which president said this in a State of the Union address?\n\n{_words(_mask(windows[i], president, last), _PROMPT_WORDS)}",
            president,
        )
        for i in picked
    ]
    return tasks, keys


def generic_tasks(doc: SplitDoc) -> tuple[list[Task], list[Key]]:
    """Any other corpus (a user's folder or JSONL): title -> first paragraph; passage -> which document."""
    title = _flat(doc.title)
    paras = [p for p in _paragraphs(doc.text) if len(p.split()) >= 8]
    if not title or not paras:
        return [], []
    tasks = [Task("document", doc.doc_id, f'What is "{title}" about?', _words(paras[0], _ANSWER_WORDS))]
    passage = paras[random.Random(_seed("passage", doc.doc_id)).randrange(len(paras))]
    keys = [
        (
            "document",
            f"Which document is this passage from?\n\n{_words(_mask(passage, title), _PROMPT_WORDS)}",
            title,
        )
    ]
    return tasks, keys


def builder_for(source: str) -> Builder:
    """The task builder of a corpus kind; the generic one for user sources."""
    return BUILDERS.get(source, generic_tasks)


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
    order = sorted(per_doc, key=lambda d: _seed(salt, d))
    for d in order:
        random.Random(_seed(salt, "within", d)).shuffle(per_doc[d])
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


def build_choices(source: str, docs: Sequence[SplitDoc], limit: int | None = None) -> list[Choice]:
    """Multiple-choice items: each key's answer and three distractors, the answers of the same kind
    of other documents in `docs` (so: the same split and domain)."""
    builder = builder_for(source)
    keys = [(doc.doc_id, key) for doc in docs for key in builder(doc)[1]]
    seen: dict[tuple[str, str], set[str]] = {}
    for _, (kind, question, answer) in keys:
        seen.setdefault((kind, question), set()).add(answer)
    keys = [(d, k) for d, k in keys if len(seen[k[:2]]) == 1]  # one question, two answers: ambiguous
    answers: dict[str, dict[str, str]] = {}  # kind -> answer -> first document giving it
    for doc_id, (kind, _, answer) in keys:
        answers.setdefault(kind, {}).setdefault(answer, doc_id)
    items = []
    for doc_id, (kind, question, answer) in keys:
        pool = sorted(a for a in answers[kind] if a != answer)
        if len(pool) < N_OPTIONS - 1:
            continue
        rng = random.Random(_seed("choice", kind, doc_id, question))
        options = [answer, *rng.sample(pool, N_OPTIONS - 1)]
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
    tmp = data_dir / f".instructions.jsonl.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        for t in tasks:
            fh.write(json.dumps(asdict(t), ensure_ascii=False) + "\n")
    os.replace(tmp, instructions_path(data_dir))
    card["tasks"] = {
        **stamp,
        "split": "train",
        "rows": len(tasks),
        "documents": len({t.doc_id for t in tasks}),
        "by_kind": dict(sorted(by_kind.items())),
        "builder": builder_for(source).__name__,
    }
    tmp_card = card_path.with_name(f".card.json.tmp-{os.getpid()}")
    tmp_card.write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp_card, card_path)
    if not tasks:
        print(f"note: expert {slug!r}: its corpus gave no instruction tasks", flush=True)
    return card["tasks"]


def load_tasks(data_dir: Path) -> list[dict[str, str]]:
    """The saved instruction rows (prompt, response, kind, doc_id) of a corpus."""
    path = instructions_path(data_dir)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

"""The task builders, one per corpus kind (`data.source`), registered with `experts.data.tasks`.

A builder turns one document of a split into instruction tasks and multiple-choice keys; what each
makes is listed in `experts.data.tasks`. Choices are seeded by the document id (`stable_seed`).
"""

from __future__ import annotations

import random
import re

from experts.data.tasks import Key, SplitDoc, Task, register_builder, stable_seed

_PROMPT_WORDS = 100  # passages inside a prompt are cut to this many words (~140 tokens)
_ANSWER_WORDS = 100  # and answers too: a task fits a 256-token training row


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
    rng = random.Random(stable_seed("options", d))
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
    rng = random.Random(stable_seed("verses", d))
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
    rng = random.Random(stable_seed("windows", d))
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
    passage = paras[random.Random(stable_seed("passage", doc.doc_id)).randrange(len(paras))]
    keys = [
        (
            "document",
            f"Which document is this passage from?\n\n{_words(_mask(passage, title), _PROMPT_WORDS)}",
            title,
        )
    ]
    return tasks, keys

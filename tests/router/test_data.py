"""Question-style views and the background split: what the router learns from."""

from __future__ import annotations

import random

from router.data import QUESTION_TEMPLATES, _split_of, as_question, question_views, split_examples

DOC = """Reading and writing files
=========================

The open() function returns a file object. It takes a path and a mode.

Closing files matters. Use a with statement so the file is closed even on errors.
"""


def test_question_views_take_title_headings_and_first_sentences():
    views = question_views(DOC, title="Input and output")
    assert views[:2] == ["Input and output", "Reading and writing files"]
    assert "The open() function returns a file object." in views
    assert "Closing files matters." not in views  # 3 words: too short to be a question
    assert len(views) == len({v.lower() for v in views})


def test_as_question_uses_a_neutral_template():
    rng = random.Random(0)
    question = as_question("The open() function.", rng)
    assert "the open() function" in question
    assert any(question == t.format("the open() function") for t in QUESTION_TEMPLATES)


def test_split_examples_fill_the_budget_with_windows_and_views():
    texts = [DOC * 20, DOC * 15]
    out = split_examples(
        texts,
        ["Input and output", "Files"],
        "python_docs",
        sizes=(4, 8),
        budget=40,
        per_doc=2,
        seed=0,
        views=True,
    )
    windows = [t for t, k in zip(out.texts, out.kinds, strict=True) if k != "view"]
    assert len(windows) == 40 and all(len(w.split()) in (4, 8) for w in windows)
    assert 0 < out.kinds.count("view") <= 14 and set(out.labels) == {"python_docs"}
    titled = ("input and output: ", "files: ")  # a title beside a run of its text (maybe templated)
    assert any(prefix in t.lower() for t in out.texts for prefix in titled)


def test_background_split_is_fixed_by_document_id():
    splits = [_split_of(f"news-{i}") for i in range(2000)]
    assert splits == [_split_of(f"news-{i}") for i in range(2000)]
    assert 0.85 < splits.count("train") / 2000 < 0.95 and splits.count("test") > 40

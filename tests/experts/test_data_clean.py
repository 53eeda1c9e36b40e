"""Cleaning, de-duplication, splitting, chunking and query windows: fast, offline, could all fail."""

from __future__ import annotations

import random

import pytest

from experts.data import Document, query_windows
from experts.data.clean import (
    clean_documents,
    drop_boilerplate,
    exact_key,
    is_text,
    near_duplicates,
    normalise,
)
from experts.data.split import SPLITS, assign_splits, chunk_text, split_of

WORDS = [
    "licence",
    "software",
    "permission",
    "copy",
    "modify",
    "merge",
    "publish",
    "distribute",
    "sublicense",
    "sell",
    "persons",
    "whom",
    "furnished",
    "subject",
    "following",
    "conditions",
    "notice",
    "included",
    "substantial",
    "portions",
    "warranty",
    "express",
    "implied",
    "merchantability",
    "fitness",
    "particular",
    "purpose",
    "noninfringement",
    "authors",
    "holders",
    "liable",
    "claim",
    "damages",
]


def _prose(seed: int, n: int = 150) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def test_normalise_applies_nfkc_collapses_spaces_and_blank_lines_and_drops_controls():
    raw = "ﬁne\u00a0 text\x00 with\t\tgaps   here\r\n\r\n\r\n\r\n  indented  line  "
    assert normalise(raw) == "fine text with gaps here\n\n  indented line"


def test_boilerplate_lines_are_dropped_and_counted():
    text = "Title\n=====\nCopyright (c) 2019 Someone\nAll rights reserved.\nReal content stays."
    cleaned, n = drop_boilerplate(text)
    assert cleaned == "Title\nReal content stays." and n == 3


def test_non_text_is_detected():
    assert is_text("A sentence of ordinary words.", 0.5)
    assert not is_text("0x1f 0x2e 0x3d 0x4c 0x5b 0x6a 0x79 0x88 | 12 34 56 78 90", 0.5)


def test_exact_key_ignores_case_and_whitespace():
    assert exact_key("Hello   World\n") == exact_key("hello world")
    assert exact_key("hello world") != exact_key("hello world!")


def test_near_duplicate_pair_is_found_and_distinct_texts_are_kept():
    base = _prose(1, 300)
    words = base.split()
    near = " ".join(words[:150] + ["changed"] + words[151:])  # one word differs
    other = _prose(2, 300)
    assert near_duplicates([base, other, near], threshold=0.8) == {2}
    assert near_duplicates([base, other], threshold=0.8) == set()


def test_clean_documents_removes_short_non_text_exact_and_near_duplicates_and_counts_them():
    base = _prose(1, 300)
    near = base.replace(base.split()[100], "changed", 1)
    docs = [
        Document("a", base),
        Document("b", "too short"),
        Document("c", "0x1f 0x2e 0x3d 0x4c 0x5b 0x6a 0x79 0x88 " * 20),
        Document("d", base.upper()),  # exact duplicate up to case
        Document("e", near),
        Document("f", _prose(7, 300)),
        Document("f", _prose(8, 300)),  # a repeated id gets a suffix
    ]
    kept, report = clean_documents(docs, min_chars=50, near_dup_threshold=0.8)
    assert [d.doc_id for d in kept] == ["a", "f", "f#2"]
    assert report["read"] == 7 and report["kept"] == 3
    removed = report["removed"]
    assert (
        removed["too_short"],
        removed["non_text"],
        removed["exact_duplicate"],
        removed["near_duplicate"],
    ) == (1, 1, 1, 1)


def test_max_documents_is_a_stable_sample_after_cleaning():
    docs = [Document(f"d{i}", _prose(i)) for i in range(20)]
    kept1, report = clean_documents(docs, min_chars=10, near_dup_threshold=0.9, max_documents=5)
    kept2, _ = clean_documents(list(reversed(docs)), min_chars=10, near_dup_threshold=0.9, max_documents=5)
    assert len(kept1) == 5 and report["removed"]["over_max_documents"] == 15
    assert {d.doc_id for d in kept1} == {d.doc_id for d in kept2}


def test_splits_are_disjoint_follow_the_fractions_and_are_stable():
    docs = [Document(f"doc-{i}", "x") for i in range(3000)]
    a = assign_splits(docs, (0.8, 0.1, 0.1))
    b = assign_splits(list(reversed(docs)), (0.8, 0.1, 0.1))
    ids = {name: {d.doc_id for d in a[name]} for name in SPLITS}
    assert ids["train"].isdisjoint(ids["validation"]) and ids["train"].isdisjoint(ids["test"])
    assert ids["validation"].isdisjoint(ids["test"])
    assert sum(map(len, ids.values())) == 3000
    assert all(ids[name] == {d.doc_id for d in b[name]} for name in SPLITS)  # order does not matter
    assert 0.77 < len(ids["train"]) / 3000 < 0.83 and 0.08 < len(ids["test"]) / 3000 < 0.12
    assert split_of("doc-1", (0.8, 0.1, 0.1)) == split_of("doc-1", (0.8, 0.1, 0.1))


def test_documents_of_one_group_share_a_split():
    docs = [Document(f"bsd-{i}", "x", group="bsd") for i in range(50)]
    placed = assign_splits(docs, (0.34, 0.33, 0.33))
    assert sorted(len(v) for v in placed.values()) == [0, 0, 50]


def test_chunks_respect_the_word_budget_and_keep_every_word_in_order():
    paras = [_prose(i, n) for i, n in enumerate([40, 70, 30, 250, 10])]
    text = "\n\n".join(paras)
    chunks = chunk_text(text, 100)
    assert len(chunks) > 1 and all(len(c.split()) <= 100 for c in chunks)
    assert " ".join(" ".join(c.split()) for c in chunks) == " ".join(text.split())
    assert chunk_text("short text", 100) == ["short text"]


def test_query_windows_are_deterministic_sized_and_indexed():
    texts = [_prose(i, 200) for i in range(5)] + ["", "only three words"]
    a = query_windows(texts, sizes=[4, 16], per_doc=3, seed=0)
    assert a == query_windows(texts, sizes=[4, 16], per_doc=3, seed=0)
    assert a != query_windows(texts, sizes=[4, 16], per_doc=3, seed=1)
    assert len(a) == 6 * 3  # the empty text gives nothing
    for idx, window in a:
        assert window in " ".join(texts[idx].split())
        assert len(window.split()) in (4, 16) or texts[idx] == "only three words"
    assert {idx for idx, _ in a} == {0, 1, 2, 3, 4, 6}


def test_query_windows_reject_bad_sizes():
    with pytest.raises(ValueError, match="positive"):
        query_windows(["a b c"], sizes=[0], per_doc=1, seed=0)


def test_small_corpus_never_leaves_validation_or_test_empty():
    from experts.data.readers import Document
    from experts.data.split import assign_splits

    # 40 names that hash to 36 train / 0 validation / 4 test with these fractions
    docs = [Document(doc_id=f"note_{i:03d}.txt", text="x") for i in range(40)]
    out = assign_splits(docs, (0.7, 0.15, 0.15))
    assert all(out[name] for name in ("train", "validation", "test"))
    assert sum(len(v) for v in out.values()) == 40
    assert assign_splits(docs, (0.7, 0.15, 0.15)) == out  # still deterministic

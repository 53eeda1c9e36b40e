"""Instruction tasks and multiple-choice items made from a corpus's own structure."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from experts.config import DataSpec, ExpertSpec, PathsSpec
from experts.data import build_corpus, load_card, load_corpus
from experts.data.readers import Document
from experts.data.sources import parse_pubmed, render_man
from experts.data.split import chunk_text
from experts.data.tasks import (
    N_OPTIONS,
    SplitDoc,
    build_choices,
    build_tasks,
    check_choices,
    load_tasks,
    write_tasks,
)
from experts.errors import DataError
from experts.evaluate import chat_example
from tests.conftest import write_toy_folder

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"


def _split_doc(doc: Document, chunk_words: int = 1000) -> SplitDoc:
    return SplitDoc(doc.doc_id, doc.title, tuple(chunk_text(doc.text, chunk_words)), doc.meta)


def _pubmed_docs() -> list[SplitDoc]:
    """The two fixture articles plus four more of the same shape, for multiple choice."""
    docs = [_split_doc(d) for d in parse_pubmed(FIXTURES / "pubmed_tiny.xml.gz")]
    for i, topic in enumerate(["asthma", "malaria", "obesity", "sepsis"]):
        text = f"Outcomes of {topic} care.\n\nObjective: We studied {topic} in adults.\nConclusions: Care improved."
        docs.append(SplitDoc(f"pmid:{900 + i}", f"Outcomes of {topic} care.", (text,), {}))
    return docs


def test_pubmed_tasks_come_from_title_and_labelled_abstract():
    tasks = build_tasks("pubmed", _pubmed_docs())
    metformin = {t.kind: t for t in tasks if t.doc_id == _pubmed_docs()[0].doc_id}
    assert set(metformin) == {"abstract_to_title", "title_to_summary", "studied", "found"}
    assert metformin["abstract_to_title"].response == "Metformin and lactic acidosis in type 2 diabetes."
    assert "Lactic acidosis was rare" in metformin["abstract_to_title"].prompt
    assert metformin["studied"].response == "Metformin is the first-line drug for type 2 diabetes."
    assert metformin["found"].response.startswith("Lactic acidosis was rare among 1200 patients")


def test_man_page_task_answers_with_name_line_and_first_description_paragraph():
    text = render_man(FIXTURES / "greet.1.gz")
    (task,) = build_tasks("man", [SplitDoc("man1/greet.1", "greet(1)", (text,), {})])
    assert task.prompt == "What does `greet` do?"
    assert task.response.startswith("greet - print a friendly greeting to standard output. greet writes")
    assert "SEE ALSO" not in task.response


def test_bible_verse_references_count_the_chapters_lines():
    verses = "In the beginning was a word.\nThe second verse follows here.\nA third verse ends it."
    doc = SplitDoc("engweb:Gen.1", "World English Bible - Gen.1", ("Chapter 1\n" + verses,), {})
    tasks = build_tasks("sword", [doc])
    quotes = {t.prompt: t.response for t in tasks if t.kind == "quote_verse"}
    assert quotes["Quote Genesis 1:2 (World English Bible)."] == "The second verse follows here."
    located = {t.response: t.prompt for t in tasks if t.kind == "locate_verse"}
    assert "A third verse ends it." in located["Genesis 1:3"]


def test_builders_are_deterministic_and_ignore_document_order():
    docs = _pubmed_docs()
    first = (build_tasks("pubmed", docs), build_choices("pubmed", docs))
    again = (build_tasks("pubmed", list(reversed(docs))), build_choices("pubmed", list(reversed(docs))))
    assert first == again
    assert len(first[1]) == len(docs)  # one "which title" item per article


def test_choices_have_four_distinct_options_and_the_key_is_the_documents_own_answer():
    docs = _pubmed_docs()
    items = build_choices("pubmed", docs)
    titles = {d.doc_id: d.title for d in docs}
    for item in items:
        assert len(set(item.options)) == N_OPTIONS
        assert item.options[item.answer] == titles[item.doc_id]
        assert [titles[d] for d in item.option_docs] == list(item.options)
    check_choices(items, "pubmed", docs)


def _two_topic_docs() -> list[SplitDoc]:
    """Six asthma and six malaria studies (their abstracts share words only within a topic) and a
    near copy of one study."""
    titles = [
        *(
            f"Asthma airway {w} trial."
            for w in ("steroid", "inhaler", "allergen", "exercise", "obesity", "smoking")
        ),
        *(
            f"Malaria parasite {w} survey."
            for w in ("mosquito", "bednet", "vaccine", "fever", "anaemia", "travel")
        ),
        "Asthma airway steroid trial",  # the first title again, but for its full stop
    ]
    return [
        SplitDoc(f"pmid:{i}", t, (f"{t}\n\n{t.lower()}",), {})  # an abstract of the title's words
        for i, t in enumerate(titles)
    ]


def test_similar_distractors_are_the_answers_neighbours_and_random_ones_are_not():
    docs = _two_topic_docs()
    topic = {d.title: d.title.split()[0] for d in docs}
    near = build_choices("pubmed", docs, distractors="similar")
    far = build_choices("pubmed", docs, distractors="random")
    assert [i.doc_id for i in near] == [i.doc_id for i in far]
    for item in near:
        answer = item.options[item.answer]
        wrong = [o for o in item.options if o != answer]
        assert {topic[o] for o in wrong} == {topic[answer]}  # all three on the answer's subject
        copies = {"Asthma airway steroid trial.", "Asthma airway steroid trial"}
        if answer in copies:
            assert not copies & set(wrong)  # the answer's near copy is no wrong option
    check_choices(near, "pubmed", docs)
    mixed = [i for i in far if len({topic[o] for o in i.options}) > 1]
    assert len(mixed) > len(far) // 2  # at random most items mix the two subjects
    with pytest.raises(DataError, match="unknown distractors"):
        build_choices("pubmed", docs, distractors="nearest")


def test_a_wrong_answer_key_fails_the_check():
    docs = _pubmed_docs()
    item = build_choices("pubmed", docs)[0]
    wrong = dataclasses.replace(item, answer=(item.answer + 1) % N_OPTIONS)
    with pytest.raises(DataError, match="the key marks"):
        check_choices([wrong], "pubmed", docs)
    # and an option from a document outside the split
    stray = dataclasses.replace(item, option_docs=(*item.option_docs[:-1], "pmid:train-only"))
    with pytest.raises(DataError, match="not in this split"):
        check_choices([stray], "pubmed", docs)


def test_chat_example_takes_the_loss_on_the_answer_only(tiny_app):
    from experts.base_model import load_tokenizer

    tok = load_tokenizer(tiny_app.base_model, tiny_app.paths)
    ids, labels = chat_example(tok, "You are terse.", "What is two plus two?", "Four.", 128)
    answer = [t for t in labels if t != -100]
    assert tok.decode(answer[:-1]) == "Four." and answer[-1] == tok.eos_token_id
    assert ids[-len(answer) :] == answer and len(ids) == len(labels)
    assert "What is two plus two?" in tok.decode(ids[: len(ids) - len(answer)])


@pytest.fixture()
def toy_corpus(tiny_app, tmp_path):
    """A user folder expert built into a temp artifacts folder (40 documents, 60/20/20)."""
    write_toy_folder(tmp_path / "texts", docs=40)
    spec = ExpertSpec(
        name="toy",
        description="toy",
        data=DataSpec(source="folder", path=str(tmp_path / "texts"), split=(0.6, 0.2, 0.2), min_chars=50),
    )
    app = dataclasses.replace(
        tiny_app, paths=PathsSpec(artifacts=str(tmp_path / "artifacts"), cache=tiny_app.paths.cache)
    )
    app = dataclasses.replace(app, experts=(spec,), expert=spec)
    build_corpus(spec, app)
    return app, spec


def test_eval_items_are_built_from_test_documents_only(toy_corpus):
    from router.task_eval import domain_items

    app, spec = toy_corpus
    corpus = load_corpus(spec.name, app.paths)
    train_ids, test_ids = set(corpus["train"]["doc_id"]), set(corpus["test"]["doc_id"])
    choices, tasks = domain_items(spec, app)
    assert choices and tasks
    used = (
        {c.doc_id for c in choices} | {d for c in choices for d in c.option_docs} | {t.doc_id for t in tasks}
    )
    assert used <= test_ids and not used & train_ids


def test_moe_data_writes_train_tasks_beside_the_corpus_with_counts_in_the_card(toy_corpus):
    app, spec = toy_corpus
    folder = app.paths.data_dir(spec.name)
    info = write_tasks(spec.name, spec.data.source, folder)
    rows = load_tasks(folder)
    train_ids = set(load_corpus(spec.name, app.paths)["train"]["doc_id"])
    assert info["rows"] == len(rows) > 0 and info["split"] == "train"
    assert {r["doc_id"] for r in rows} <= train_ids
    assert load_card(spec.name, app.paths)["tasks"]["by_kind"] == {"document": len(rows)}
    before = (folder / "instructions.jsonl").stat().st_mtime_ns
    assert write_tasks(spec.name, spec.data.source, folder) == info  # current: not rebuilt
    assert (folder / "instructions.jsonl").stat().st_mtime_ns == before
    assert json.loads((folder / "instructions.jsonl").read_text().splitlines()[0])["prompt"]


def test_training_mixes_tasks_by_the_configured_ratio(toy_corpus):
    from experts.base_model import load_tokenizer
    from experts.train_data import build_train_data

    app, spec = toy_corpus
    tok = load_tokenizer(app.base_model, app.paths)
    mixed = build_train_data(
        dataclasses.replace(app, train=dataclasses.replace(app.train, instruction_ratio=0.5)), spec, tok
    )
    raw = build_train_data(
        dataclasses.replace(app, train=dataclasses.replace(app.train, instruction_ratio=0.0)), spec, tok
    )
    want = app.train.steps * app.train.batch_size  # 8 rows in the tiny profile
    assert mixed.sources["tasks"] == want // 2 and mixed.sources["toy"] == want - want // 2
    assert "tasks" not in raw.sources and raw.sources["toy"] == want
    # task rows carry the loss on their answers only
    task_labels = mixed.labels[mixed.sources["toy"] :]
    assert (task_labels == -100).any(dim=1).all() and (task_labels != -100).any(dim=1).all()


def test_answer_loss_is_the_token_weighted_negative_log_likelihood_and_accuracy_reads_the_key():
    import torch

    from router.task_eval import _row_stats, choice_correct

    # two answers: 2 tokens at log-probability -1 each, 6 tokens at -3 each: (2 + 18) / 8 nats a token
    stats = _row_stats("loss", torch.tensor([[-2.0, 2.0], [-18.0, 6.0]]), seed=0)
    assert stats["value"] == pytest.approx(2.5) and stats["lo"] <= 2.5 <= stats["hi"]
    item = build_choices("pubmed", _pubmed_docs())[0]
    scores = torch.full((N_OPTIONS, 2), -5.0)
    scores[item.answer, 0] = -1.0  # the keyed option is the likeliest
    prior = torch.zeros(N_OPTIONS, 2)  # no prior: the calibrated rule reads the scores as they are
    assert choice_correct(scores, [item], prior=prior).tolist() == [1.0]
    wrong = dataclasses.replace(item, answer=(item.answer + 1) % N_OPTIONS)
    assert choice_correct(scores, [wrong], prior=prior).tolist() == [0.0]

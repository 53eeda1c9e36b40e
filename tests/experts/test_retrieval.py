"""Retrieval index: no pickle on disk, a round trip that finds the right document, the prompt."""

from __future__ import annotations

import dataclasses
import json

import pytest

from experts.errors import ArtifactError
from experts.retrieval import Passage, build_index_from_rows, grounded_prompt, load_index_dir

ROWS = [
    {
        "doc_id": "fork",
        "title": "fork(2)",
        "text": "fork creates a child process by duplicating the calling process. " * 3,
    },
    {
        "doc_id": "chmod",
        "title": "chmod(2)",
        "text": "chmod changes the permission bits of a file mode. " * 3,
    },
    {
        "doc_id": "socket",
        "title": "socket(2)",
        "text": "socket creates an endpoint for network communication. " * 3,
    },
    {"doc_id": "long", "title": "", "text": " ".join(f"word{i}" for i in range(300)) + " zebracorn"},
]


@pytest.fixture()
def index_folder(tmp_path):
    return build_index_from_rows(ROWS, tmp_path / "legal" / "index", slug="legal", chunk_words=120)


def test_index_round_trip_without_pickle(index_folder):
    names = sorted(p.name for p in index_folder.iterdir())
    assert names == ["matrix.safetensors", "passages.jsonl", "vocabulary.json"]
    for path in index_folder.iterdir():  # no pickle opcode stream anywhere (protocol 2+ starts with 0x80)
        assert not path.read_bytes().startswith(b"\x80")
    meta = json.loads((index_folder / "vocabulary.json").read_text())
    assert meta["documents"] == 4 and meta["passages"] == 6  # the 301-word row became 3 windows (120+120+61)
    index = load_index_dir(index_folder)
    assert index.slug == "legal" and len(index) == 6


@pytest.mark.parametrize(
    ("query", "doc"),
    [
        ("What does fork return to the child process?", "fork"),
        ("change file permission", "chmod"),
        ("network endpoint", "socket"),
        ("zebracorn", "long"),
    ],
)
def test_search_finds_the_distinctive_document(index_folder, query, doc):
    hits = load_index_dir(index_folder).search(query, k=2)
    assert hits and hits[0].doc_id == doc
    assert hits[0].score > 0 and all(isinstance(h, Passage) for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_search_without_shared_terms_returns_nothing(index_folder):
    index = load_index_dir(index_folder)
    assert index.search("qwertyuiop", k=3) == []
    assert index.search("", k=3) == []
    assert len(index.search("process file network", k=10)) == 3  # only passages sharing a term


def test_missing_or_corrupt_index_names_the_fix(index_folder, tmp_path):
    with pytest.raises(ArtifactError, match="moe index expert=nothing"):
        load_index_dir(tmp_path / "nothing" / "index")
    (index_folder / "vocabulary.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        load_index_dir(index_folder)


def test_grounded_prompt_numbers_the_sources():
    ps = [Passage("a", "fork(2)", "fork creates a child " * 100, 0.5), Passage("b", "", "short", 0.1)]
    prompt = grounded_prompt("What does fork do?", ps, max_chars=50)
    assert "[1] fork(2): fork creates" in prompt and "[2] short" in prompt
    assert prompt.rstrip().endswith("Question: What does fork do?")
    assert len(prompt) < 300  # snippets were cut
    assert grounded_prompt("q?", []) == "q?"


def test_index_command_builds_from_the_train_split(tmp_path, monkeypatch):
    """`build_index` reads the corpus train split only (the held-out splits stay held out)."""
    from datasets import Dataset, DatasetDict

    from experts.config import compose
    from experts.retrieval import index_command, load_index

    monkeypatch.setenv("MOE_ARTIFACTS", str(tmp_path / "artifacts"))
    app = compose(["expert=legal"])
    split = lambda rows: Dataset.from_list([{"doc_id": d, "title": "", "text": t} for d, t in rows])  # noqa: E731
    DatasetDict(
        train=split([("gpl", "copyleft licence terms for software")]),
        validation=split([("mit", "permissive licence")]),
        test=split([("heldout", "secret heldout words")]),
    ).save_to_disk(str(app.paths.data_dir("legal") / "dataset"))
    (folder,) = index_command(app, None)
    index = load_index(app, "legal")
    assert folder.exists() and [p["doc_id"] for p in index.passages] == ["gpl"]
    assert index.search("secret heldout", 3) == []

    from serving.cli import main

    assert main(["index", "expert=legal"]) == 0  # the same through `moe index`
    assert load_index(app, "legal").passages == index.passages


def test_retrieval_knobs_are_validated():
    from experts.config import ExpertServingSpec, build
    from experts.errors import ConfigError

    spec = build(ExpertServingSpec, {"retrieval": True, "retrieval_top_k": 5})
    assert spec.retrieval_top_k == 5 and spec.retrieval_chunk_words == 120
    with pytest.raises(ConfigError, match="retrieval_top_k 0 must be >= 1"):
        build(ExpertServingSpec, {"retrieval_top_k": 0})


def test_load_retrievers_names_the_missing_index(tmp_path, monkeypatch):
    from experts.config import compose
    from experts.retrieval import load_retrievers

    monkeypatch.setenv("MOE_ARTIFACTS", str(tmp_path / "artifacts"))
    app = compose([])
    assert load_retrievers(app) == {}  # no shipped expert turns retrieval on by default
    legal = app.get_expert("legal")
    grounded = dataclasses.replace(legal, serving=dataclasses.replace(legal.serving, retrieval=True))
    app = dataclasses.replace(app, experts=(grounded,))
    with pytest.raises(ArtifactError, match="moe index expert=legal"):
        load_retrievers(app)

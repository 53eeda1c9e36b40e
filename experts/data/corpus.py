"""Build, save and load an expert's corpus: read -> clean -> split by document -> chunk -> save.

Output per expert, under `paths.data_dir(slug)` (artifacts/data/<slug>/):
  dataset/   a `datasets.DatasetDict` (train, validation, test; `instructions` when configured)
  card.json  sources and licence, documents/rows/tokens per split, what cleaning removed,
             the resolved data config and its hash (a second build with the same hash is a no-op)
  instructions.jsonl  `moe data`: instruction tasks made from the train split (experts/data/tasks.py),
             their counts in card.json's `tasks`
Everything is written to a temporary folder first and renamed into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from experts.atomic import replace_dir
from experts.config import AppConfig, BaseModelSpec, ExpertSpec, PathsSpec
from experts.data.clean import clean_documents
from experts.data.instructions import load_instructions
from experts.data.readers import BUILD_OPTIONS, Document, get_reader
from experts.data.split import SPLITS, assign_splits, chunk_text
from experts.data.tasks import write_tasks
from experts.errors import ArtifactError, ConfigError, DataError

log = logging.getLogger(__name__)

# Bump when reading, cleaning or splitting changes what a build produces: cached corpora rebuild.
BUILD_VERSION = 4
MIXTURE = "mixture"  # the generalist's source: built by training from the other corpora
_TOKEN_BATCH = 512
_TOKENIZERS: dict[str, Any] = {}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _missing(slug: str, where: Path) -> ArtifactError:
    return ArtifactError(f"no corpus for expert {slug!r} at {where}; run `moe data expert={slug}`")


def load_corpus(slug: str, paths: PathsSpec) -> Any:
    """The saved `datasets.DatasetDict` of an expert (splits train, validation, test[, instructions])."""
    from datasets import DatasetDict

    folder = paths.data_dir(slug) / "dataset"
    if not (folder / "dataset_dict.json").exists():
        raise _missing(slug, paths.data_dir(slug))
    return DatasetDict.load_from_disk(str(folder))


def load_card(slug: str, paths: PathsSpec) -> dict:
    """The corpus card (card.json) of an expert."""
    path = paths.data_dir(slug) / "card.json"
    if not path.exists():
        raise _missing(slug, paths.data_dir(slug))
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is corrupt ({exc}); run `moe data expert={slug}` again") from None


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------
def _tokenizer_id(base: BaseModelSpec) -> str:
    """Base models that share a tokenizer share token counts (the tiny test model borrows one)."""
    return _tokenizer_id(base.tokenizer_from) if base.tokenizer_from is not None else base.name


def _source_fingerprint(spec: ExpertSpec) -> list:
    """Names, sizes and mtimes of user files, so editing a user corpus triggers a rebuild."""
    files: list[Path] = []
    for raw in (spec.data.path, spec.data.instructions):
        if raw and Path(raw).expanduser().exists():
            p = Path(raw).expanduser()
            files.extend(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def config_hash(spec: ExpertSpec, app: AppConfig) -> str:
    """Hash of everything a build depends on: data config, tokenizer, build version, user files."""
    payload = {
        "build_version": BUILD_VERSION,
        "data": dataclasses.asdict(spec.data),
        "tokenizer": _tokenizer_id(app.base_model),
        "files": _source_fingerprint(spec),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _tokenizer(app: AppConfig) -> Any:
    from experts.base_model import load_tokenizer

    key = _tokenizer_id(app.base_model)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_tokenizer(app.base_model, app.paths)
    return _TOKENIZERS[key]


def count_tokens(texts: Sequence[str], tokenizer: Any, progress: bool = False, desc: str = "tokens") -> int:
    """Number of tokens of `texts` (no special tokens), encoded in batches by the Rust tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    total = 0
    bar = tqdm(total=len(texts), desc=desc, unit="row", disable=not progress or None)
    for i in range(0, len(texts), _TOKEN_BATCH):
        batch = list(texts[i : i + _TOKEN_BATCH])
        if backend is not None:
            total += sum(len(e.ids) for e in backend.encode_batch(batch, add_special_tokens=False))
        else:
            total += sum(len(ids) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"])
        bar.update(len(batch))
    bar.close()
    return total


def _rows(docs: list[Document], chunk_words: int) -> dict[str, list]:
    rows: dict[str, list] = {"doc_id": [], "chunk": [], "text": [], "title": [], "meta": []}
    for doc in docs:
        meta = json.dumps(doc.meta, ensure_ascii=False, default=str)
        for i, piece in enumerate(chunk_text(doc.text, chunk_words)):
            rows["doc_id"].append(doc.doc_id)
            rows["chunk"].append(i)
            rows["text"].append(piece)
            rows["title"].append(doc.title)
            rows["meta"].append(meta)
    return rows


def build_corpus(spec: ExpertSpec, app: AppConfig, force: bool = False, *, progress: bool = False) -> Path:
    """Fetch, clean, split and save the corpus of one expert; return its folder.

    A no-op when the saved card's config hash matches (unless `force`).
    """
    from datasets import Dataset, DatasetDict, Features, Value

    data = spec.data
    if data.source == MIXTURE:
        raise ConfigError(
            f"expert {spec.name!r} has data.source 'mixture': training builds it from the other experts' "
            "corpora; `moe data` builds only those"
        )
    out = app.paths.data_dir(spec.name)
    digest = config_hash(spec, app)
    card_path = out / "card.json"
    if not force and card_path.exists() and (out / "dataset" / "dataset_dict.json").exists():
        try:
            if json.loads(card_path.read_text()).get("config_hash") == digest:
                return out
        except json.JSONDecodeError:
            pass  # corrupt card: rebuild
    if progress:
        print(f"building corpus of {spec.name!r} ({data.source}) ...", file=sys.stderr, flush=True)
    reader = get_reader(data.source)
    opts = {**BUILD_OPTIONS, **{k: v for k, v in data.options.items() if k in BUILD_OPTIONS}}
    instructions = load_instructions(data.instructions) if data.instructions else None
    start = time.perf_counter()

    docs, report = clean_documents(
        reader(data, app.paths),
        min_chars=data.min_chars,
        near_dup_threshold=data.near_dup_threshold,
        min_alpha_ratio=float(opts["min_alpha_ratio"]),
        max_documents=data.max_documents,
        progress=progress,
    )
    if not docs:
        raise DataError(
            f"corpus of expert {spec.name!r} is empty after cleaning (read {report['read']} documents; "
            f"removed {report['removed']}); check data.source/data.path or lower data.min_chars"
        )
    by_split = assign_splits(docs, data.split)
    if not by_split["train"]:
        raise DataError(
            f"expert {spec.name!r}: no document landed in the train split ({len(docs)} documents); add documents"
        )
    for name in SPLITS[1:]:
        if not by_split[name]:
            log.warning(
                "expert %r: the %s split is empty (%d documents); add documents", spec.name, name, len(docs)
            )

    tok = _tokenizer(app)
    features = Features(
        {
            "doc_id": Value("string"),
            "chunk": Value("int32"),
            "text": Value("string"),
            "title": Value("string"),
            "meta": Value("string"),
        }
    )
    splits: dict[str, Any] = {}
    stats: dict[str, dict[str, int]] = {}
    for name in SPLITS:
        rows = _rows(by_split[name], int(opts["chunk_words"]))
        splits[name] = Dataset.from_dict(rows, features=features)
        stats[name] = {
            "documents": len(by_split[name]),
            "rows": len(rows["text"]),
            "tokens": count_tokens(rows["text"], tok, progress, desc=f"{spec.name} {name} tokens"),
        }
    if instructions is not None:
        splits["instructions"] = Dataset.from_list(instructions)

    card = {
        "expert": spec.name,
        "description": spec.description,
        "source": data.source,
        "packages": [{**dataclasses.asdict(p), "pin": p.pin} for p in data.packages],
        "path": data.path,
        "hf_id": data.hf_id,
        "licence": data.licence,
        "tokenizer": _tokenizer_id(app.base_model),
        "splits": stats,
        **{f"{name}_tokens": stats[name]["tokens"] for name in SPLITS},
        **{f"{name}_documents": stats[name]["documents"] for name in SPLITS},
        "cleaning": report,
        "instructions": {"path": data.instructions, "rows": len(instructions)} if instructions else None,
        "config_hash": digest,
        "build_version": BUILD_VERSION,
        "data_config": dataclasses.asdict(data),
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "build_seconds": round(time.perf_counter() - start, 1),
    }

    from datasets import disable_progress_bars, enable_progress_bars

    with replace_dir(out) as staged:
        disable_progress_bars()  # one bar per split and shard is noise next to our own
        try:
            DatasetDict(splits).save_to_disk(str(staged / "dataset"))
        finally:
            enable_progress_bars()
        (staged / "card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    return out


# --------------------------------------------------------------------------------------------
# `moe data`
# --------------------------------------------------------------------------------------------
def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def data_command(app: AppConfig, ctx: Any) -> list[Path]:
    """`moe data [expert=<slug>|all]`: build each expert's corpus and print a summary table.

    Without an expert (or with expert=all) every configured expert is built; the generalist's
    mixture is skipped (training builds it). MOE_DATA_FORCE=1 rebuilds even when cached.
    """
    specs = [app.expert] if app.expert is not None else list(app.experts)
    force = os.environ.get("MOE_DATA_FORCE", "") not in ("", "0")
    header = [
        "expert",
        "status",
        "docs train/val/test",
        "train tokens",
        "read",
        "short",
        "non-text",
        "exact dup",
        "near dup",
        "boilerplate lines",
        "seconds",
        "instructions",
    ]
    table = [header]
    built: list[Path] = []
    total = time.perf_counter()
    for spec in specs:
        if spec.data.source == MIXTURE:
            print(
                f"note: skipping {spec.name!r} (data.source 'mixture'): training mixes the other experts' corpora"
            )
            continue
        t = time.perf_counter()
        before = _card_hash(spec, app)
        path = build_corpus(spec, app, force=force, progress=True)
        built.append(path)
        tasks = write_tasks(spec.name, spec.data.source, path)  # instruction tasks of the train split
        card = load_card(spec.name, app.paths)
        status = "cached" if before == card["config_hash"] and not force else "built"
        removed = card["cleaning"]["removed"]
        docs = "/".join(str(card["splits"][s]["documents"]) for s in SPLITS)
        table.append(
            [
                spec.name,
                status,
                docs,
                f"{card['train_tokens']:,}",
                str(card["cleaning"]["read"]),
                str(removed["too_short"]),
                str(removed["non_text"]),
                str(removed["exact_duplicate"]),
                str(removed["near_duplicate"]),
                str(removed["boilerplate_lines"]),
                f"{time.perf_counter() - t:.1f}",
                f"{tasks['rows']:,}",
            ]
        )
    if len(table) > 1:
        print(_table(table))
        print(f"corpora in {app.paths.artifacts_dir / 'data'} ({time.perf_counter() - total:.1f} s)")
    return built


def _card_hash(spec: ExpertSpec, app: AppConfig) -> str | None:
    try:
        return load_card(spec.name, app.paths).get("config_hash")
    except ArtifactError:
        return None

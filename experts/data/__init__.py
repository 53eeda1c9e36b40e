"""Expert corpora: fetch each expert's source, clean, de-duplicate, split by document, save.

Public API (other packages call these; keep the signatures):
  data_command(app, ctx)                        `moe data [expert=<slug>|all]`
  build_corpus(spec, app, force=False) -> Path  build one expert's corpus (no-op when cached)
  load_corpus(slug, paths) -> DatasetDict       splits train/validation/test[/instructions]
  load_card(slug, paths) -> dict                card.json: sources, counts, tokens, cleaning
  query_windows(texts, sizes, per_doc, seed)    query-like word windows for the router
  READERS, register_reader                      the source-kind registry (`data.source`)
"""

from experts.data import sources as _sources  # noqa: F401  (registers the package readers)
from experts.data.corpus import build_corpus, data_command, load_card, load_corpus
from experts.data.readers import READERS, Document, register_reader
from experts.data.windows import query_windows

__all__ = [
    "READERS",
    "Document",
    "build_corpus",
    "data_command",
    "load_card",
    "load_corpus",
    "query_windows",
    "register_reader",
]
